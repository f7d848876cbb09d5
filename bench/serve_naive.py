"""The naive baseline for bench/serve.py: what a user might write instead of the BentoML service.

FastAPI + PyTorch eager, one image per request, one uvicorn process, no batching, no ONNX Runtime:

    NAIVE_MODEL=outputs/cnn/model.pt .venv/bin/uvicorn bench.serve_naive:app --port 8000 --workers 1

``POST /classify`` takes ``multipart/form-data`` with ONE file in the field ``images`` (the field name
the service uses, so the same load scripts drive both) and answers the service's response shape:
``[{"label", "index", "score", "top_k": [...]}]``. ``GET /healthz`` answers once the model is loaded.

Written the way the FastAPI and torchvision tutorials show it (``async def`` endpoint, the model
called inline, torchvision transforms), with the same weights as the service's ONNX model (the
train stage's ``outputs/<arch>/model.pt``, read by ``pipeline.modelfile.load_model_file``) and the
same preprocessing arithmetic (PIL decode -> L/RGB -> bilinear resize -> x/255 -> (x-mean)/std).
"""
from __future__ import annotations

import io
import os

import torch
from fastapi import FastAPI, File, HTTPException, UploadFile
from PIL import Image
from torchvision import transforms

from pipeline.modelfile import load_model_file

MODEL_PATH = os.environ.get("NAIVE_MODEL", "outputs/cnn/model.pt")
TOP_K = int(os.environ.get("NAIVE_TOP_K", "5"))

model, meta = load_model_file(MODEL_PATH)
classes = [str(c) for c in meta["classes"]]
mode = "L" if meta["in_channels"] == 1 else "RGB"
size = int(meta["image_size"])
transform = transforms.Compose([
    transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BILINEAR),
    transforms.ToTensor(),
    transforms.Normalize(meta["mean"], meta["std"]),
])

app = FastAPI(title="naive classifier (FastAPI + PyTorch eager)")


@app.get("/healthz")
async def healthz() -> dict:
    return {"ok": True, "arch": meta["arch"], "torch_threads": torch.get_num_threads()}


@app.post("/classify")
async def classify(images: UploadFile = File(...)) -> list[dict]:
    data = await images.read()
    try:
        img = Image.open(io.BytesIO(data)).convert(mode)
    except Exception as err:
        raise HTTPException(status_code=400, detail=f"cannot decode image: {err}") from err
    x = transform(img).unsqueeze(0)
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=1)[0]
    scores, indices = probs.topk(min(TOP_K, len(classes)))
    top = [{"label": classes[i], "index": int(i), "score": float(s)} for s, i in zip(scores.tolist(), indices.tolist())]
    return [{**top[0], "top_k": top}]
