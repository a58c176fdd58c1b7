"""Locust users for bench/load_service.py: ``LOAD_TARGET`` embed_image or search_no_cot (or search_cot),
``LOAD_IMAGE`` the reference image to upload, ``LOAD_TOKEN`` a bearer token if the service wants one."""

import os

from locust import HttpUser, constant, task

IMAGE = open(os.environ["LOAD_IMAGE"], "rb").read()
TARGET = os.environ.get("LOAD_TARGET", "embed_image")
HEADERS = {"Authorization": f"Bearer {os.environ['LOAD_TOKEN']}"} if os.environ.get("LOAD_TOKEN") else {}


class Client(HttpUser):
    wait_time = constant(0)  # each user sends its next request as soon as the last is answered

    @task
    def call(self):
        if TARGET == "embed_image":
            self.client.post("/embed_image", files={"images": ("ref.png", IMAGE)}, headers=HEADERS)
        else:
            mode = "cot" if TARGET == "search_cot" else "no_cot"
            self.client.post("/search", files={"image": ("ref.png", IMAGE)},
                             data={"modification": "make the red shape blue", "k": "10", "mode": mode},
                             headers=HEADERS, name=f"/search {mode}")
