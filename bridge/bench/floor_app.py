"""The framework floor: a Flask route that only reads the body and answers 200, on the same
gunicorn gthread settings as `wecom-bridge serve` (compare_releases.py measures it)."""

from __future__ import annotations

from flask import Flask, Response, request

app = Flask("floor")


@app.post("/wxcomapp")
def callback() -> Response:
    request.get_data(cache=False)
    return Response(b"", status=200, mimetype="text/plain")


@app.get("/readyz")
def readyz() -> Response:
    return Response(b"{}", status=200, mimetype="application/json")
