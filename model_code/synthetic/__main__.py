"""``python -m model_code.synthetic --out DIR``: generate the cir-shapes benchmark (see generate.py)."""

from model_code.synthetic.generate import main

raise SystemExit(main())
