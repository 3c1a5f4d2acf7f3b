"""A search service over an index: a JSON API and a small Vietnamese web page.

    python launch/serve.py --index index/ [--model runs/exp1] --host 127.0.0.1 --port 8080
    open http://127.0.0.1:8080/

The model and the index are loaded once (GPU when present; `--backend onnx` runs the
encoders on onnxruntime). Routes:
    GET  /health                       status, counts, model fingerprint
    GET  /search?q=TEXT&k=24&offset=0  text → image
    POST /search/image (multipart 'file')   image → text (shard indexes) and image → image
    POST /tags (multipart: 'tags' one per line, and 'file' or 'id')   zero-shot tags
    GET  /thumb/ID                     a JPEG thumbnail of indexed image ID (only indexed items)
    GET  /                             the page
Every request is untrusted: queries and uploads are capped, uploads are decoded with the
same safe image loader as everything else, thumbnails are served by index id only (no
path reaches the file system), and the page writes captions as text, never as HTML.
"""
from __future__ import annotations

import argparse
import io
import logging
import sys
from collections import OrderedDict
from typing import Optional, Sequence

import torch
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response

from phoclip.errors import EXPECTED_ERRORS, one_line
from phoclip.images import BadImage, decode_rgb
from phoclip.log import init_logger
from phoclip.gallery import load_item_image
from phoclip.index import EmbeddingIndex
from phoclip.search import DEFAULT_TEMPLATES, embed_images, embed_texts, query_processor, tag_embeddings
from phoclip.text import strip_controls

logger = logging.getLogger("serve")

MAX_QUERY_CHARS = 512
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_UPLOAD_PIXELS = 40_000_000
MAX_K = 100
MAX_TAGS = 200


class Service:
    """The loaded model, index and query processor; what the routes call."""

    def __init__(self, index_dir: str, model: Optional[str] = None, backend: str = "torch",
                 device: str = "auto", vncorenlp_dir: Optional[str] = None) -> None:
        from phoclip_train.export import load_encoder

        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   "cpu" if device == "auto" else device)
        self.index = EmbeddingIndex(index_dir)
        # onnxruntime takes numpy on the host; its own providers pick the device
        self.enc_device = torch.device("cpu") if backend == "onnx" else self.device
        self.model, tok = load_encoder(model or self.index.meta["model"], backend, str(self.enc_device))
        self.index.check_model(self.model)
        self.proc = query_processor(self.model, tok, None, vncorenlp_dir)
        self.size = int(self.model.config["vision"].get("image_size", 224))
        self.items = self.index.items("images")
        self.has_captions = self.index.meta["count"].get("captions", 0) > 0
        self.index.embeddings("images")  # load (and check) now, not at the first query
        if self.has_captions:
            self.index.embeddings("captions")
        self._thumbs: OrderedDict = OrderedDict()

    def _image_hit(self, rank: int, score: float, i: int) -> dict:
        it = self.items[i]
        return {"rank": rank, "score": round(score, 4), "id": i, "key": str(it.get("key", "")),
                "caption": strip_controls(str(it.get("caption") or "")),
                "path": strip_controls(str(it.get("path") or "")), "thumb": f"/thumb/{i}"}

    def search_text(self, q: str, k: int, offset: int) -> list[dict]:
        emb = embed_texts(self.model, self.proc, [q], self.enc_device)
        s, i = self.index.search(emb, k + offset, "images")
        return [self._image_hit(r + 1, float(s[0, r]), int(i[0, r])) for r in range(offset, s.shape[1])]

    def search_image(self, img, k: int) -> dict:
        emb = embed_images(self.model, [img], self.size, self.enc_device)
        s, i = self.index.search(emb, k, "images")
        out = {"images": [self._image_hit(r + 1, float(s[0, r]), int(i[0, r])) for r in range(s.shape[1])],
               "captions": []}
        if self.has_captions:
            caps = self.index.items("captions")
            s, i = self.index.search(emb, k, "captions")
            out["captions"] = [{"rank": r + 1, "score": round(float(s[0, r]), 4),
                                "caption": strip_controls(str(caps[int(i[0, r])].get("caption", ""))),
                                "image": caps[int(i[0, r])].get("image")} for r in range(s.shape[1])]
        return out

    def tags(self, tags: list[str], k: int, img=None, item_id: Optional[int] = None) -> list[dict]:
        W = tag_embeddings(self.model, tags, self.proc, DEFAULT_TEMPLATES)
        if img is not None:
            emb = embed_images(self.model, [img], self.size, self.enc_device)[0]
        else:
            emb = self.index.embeddings("images")[item_id]
        sc = W @ emb.float()
        top = sc.topk(min(k, len(tags)))
        return [{"tag": tags[int(j)], "score": round(float(v), 4)} for v, j in zip(top.values, top.indices)]

    def thumbnail(self, i: int, size: int = 256) -> bytes:
        if i in self._thumbs:
            self._thumbs.move_to_end(i)
            return self._thumbs[i]
        im = load_item_image(self.items[i])
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
        self._thumbs[i] = buf.getvalue()
        if len(self._thumbs) > 2048:
            self._thumbs.popitem(last=False)
        return self._thumbs[i]


def create_app(service: Service, max_upload: int = MAX_UPLOAD_BYTES):
    """The FastAPI app over a loaded `Service`."""

    app = FastAPI(title="PhoCLIP search", docs_url=None, redoc_url=None)
    headers = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}

    @app.middleware("http")
    async def cap_body(request: Request, call_next):
        # refuse an oversized upload from its header, before reading it
        n = request.headers.get("content-length")
        if n is not None and (not n.isdigit() or int(n) > max_upload + 64 * 1024):
            return JSONResponse({"detail": f"request body over {max_upload} bytes"}, status_code=413)
        resp = await call_next(request)
        for k, v in headers.items():
            resp.headers.setdefault(k, v)
        return resp

    async def read_image(file: UploadFile):
        data = await file.read(max_upload + 1)
        if len(data) > max_upload:
            raise HTTPException(413, f"upload over {max_upload} bytes")
        try:
            return decode_rgb(data, MAX_UPLOAD_PIXELS)
        except BadImage as e:
            raise HTTPException(415 if e.reason in ("not_an_image", "empty") else 422,
                                f"not a usable image ({e.reason})") from None

    def check_k(k: int) -> int:
        if not 1 <= k <= MAX_K:
            raise HTTPException(422, f"k must be in 1..{MAX_K}")
        return k

    @app.get("/health")
    def health():
        return {"status": "ok", "images": len(service.items),
                "captions": service.index.meta["count"].get("captions", 0),
                "model": service.index.fingerprint, "device": str(service.device)}

    @app.get("/search")
    def search(q: str = Query(..., max_length=MAX_QUERY_CHARS * 4), k: int = 24, offset: int = 0):
        q = q.strip()
        if not q or len(q) > MAX_QUERY_CHARS:
            raise HTTPException(422, f"q must have 1..{MAX_QUERY_CHARS} characters")
        if not 0 <= offset <= 10 * MAX_K:
            raise HTTPException(422, f"offset must be in 0..{10 * MAX_K}")
        return {"query": q, "offset": offset, "results": service.search_text(q, check_k(k), offset)}

    @app.post("/search/image")
    async def search_image(file: UploadFile = File(...), k: int = Form(12)):
        return service.search_image(await read_image(file), check_k(k))

    @app.post("/tags")
    async def tags(tags: str = Form(..., max_length=64 * 1024), k: int = Form(3),
                   file: Optional[UploadFile] = File(None), id: Optional[int] = Form(None)):
        names = [t.strip() for t in tags.splitlines() if t.strip()][:MAX_TAGS]
        if not names or any(len(t) > MAX_QUERY_CHARS for t in names):
            raise HTTPException(422, "give 1..200 tags, one per line, each under 512 characters")
        if file is None and id is None:
            raise HTTPException(422, "give an image ('file') or an indexed image id ('id')")
        if id is not None and not 0 <= id < len(service.items):
            raise HTTPException(404, "no such indexed image")
        img = await read_image(file) if file is not None else None
        return {"tags": service.tags(names, check_k(k), img, id)}

    @app.get("/thumb/{item_id}")
    def thumb(item_id: int):
        if not 0 <= item_id < len(service.items):
            raise HTTPException(404, "no such indexed image")
        try:
            data = service.thumbnail(item_id)
        except Exception as e:  # a moved or broken file: the item, not the service, fails
            logger.warning("no thumbnail for item %d: %s", item_id, e)
            raise HTTPException(404, "thumbnail unavailable") from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/", response_class=HTMLResponse)
    def page():
        return HTMLResponse(PAGE, headers={"Content-Security-Policy": CSP})

    @app.get("/app.js")
    def script():
        return Response(SCRIPT, media_type="text/javascript")

    return app


CSP = ("default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; img-src 'self' blob:; "
       "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'")

PAGE = """<!doctype html>
<html lang="vi"><head><meta charset="utf-8"><title>PhoCLIP — tìm ảnh bằng tiếng Việt</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font-family:system-ui,sans-serif;margin:0 auto;max-width:1100px;padding:16px;color:#222}
h1{font-size:22px}form{display:flex;gap:8px}#q{flex:1;font-size:17px;padding:8px}
button{font-size:16px;padding:8px 14px}
#drop{margin:12px 0;padding:14px;border:2px dashed #aaa;border-radius:8px;text-align:center;color:#555}
#drop.over{border-color:#2a6;background:#efe}
#grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(180px,1fr));gap:12px;margin-top:12px}
figure{margin:0;border:1px solid #ddd;border-radius:6px;padding:6px;background:#fafafa}
figure img{width:100%;height:160px;object-fit:cover;border-radius:4px}
figcaption{font-size:13px;margin-top:4px;overflow-wrap:anywhere}.score{color:#777;font-size:12px}
#status{color:#555;margin-top:8px}#pager{margin-top:12px;display:flex;gap:8px}
#captions li{margin:3px 0}
</style></head><body>
<h1>PhoCLIP — tìm ảnh bằng tiếng Việt</h1>
<form id="f"><input id="q" name="q" autocomplete="off" placeholder="Ví dụ: một con chó chạy trên bãi cỏ">
<button id="go" type="submit">Tìm</button></form>
<div id="drop">Kéo thả một ảnh vào đây (hoặc <label><u>chọn ảnh</u><input id="file" type="file" accept="image/*" hidden></label>) để tìm ảnh tương tự và chú thích phù hợp</div>
<div id="status"></div><ol id="captions"></ol><div id="grid"></div>
<div id="pager"><button id="prev" type="button" hidden>← Trang trước</button><button id="next" type="button" hidden>Trang sau →</button></div>
<script src="/app.js"></script></body></html>
"""

SCRIPT = r"""
const K = 24; let query = "", offset = 0;
const $ = (id) => document.getElementById(id);
function status(t) { $("status").textContent = t; }
function show(results) {
  const grid = $("grid"); grid.replaceChildren();
  for (const r of results) {
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.className = "thumb"; img.loading = "lazy"; img.src = r.thumb; img.alt = r.caption || r.key;
    const cap = document.createElement("figcaption");
    const sc = document.createElement("div"); sc.className = "score";
    sc.textContent = "#" + r.rank + " · " + r.score.toFixed(3);
    const txt = document.createElement("div"); txt.textContent = r.caption || r.path || r.key;
    cap.append(sc, txt); fig.append(img, cap); grid.append(fig);
  }
}
async function search(q, off) {
  query = q; offset = off; $("captions").replaceChildren();
  status("Đang tìm…");
  const res = await fetch("/search?" + new URLSearchParams({q: q, k: K, offset: off}));
  const body = await res.json();
  if (!res.ok) { status("Lỗi: " + (body.detail || res.status)); return; }
  show(body.results);
  status(body.results.length ? "Kết quả " + (off + 1) + "–" + (off + body.results.length) + " cho «" + q + "»"
                             : "Không có kết quả");
  $("prev").hidden = off === 0; $("next").hidden = body.results.length < K;
}
async function searchImage(file) {
  status("Đang tìm theo ảnh…"); $("prev").hidden = $("next").hidden = true;
  const fd = new FormData(); fd.append("file", file); fd.append("k", K);
  const res = await fetch("/search/image", {method: "POST", body: fd});
  const body = await res.json();
  if (!res.ok) { status("Lỗi: " + (body.detail || res.status)); return; }
  show(body.images);
  const ol = $("captions"); ol.replaceChildren();
  for (const c of body.captions.slice(0, 5)) {
    const li = document.createElement("li"); li.textContent = c.caption + " (" + c.score.toFixed(3) + ")"; ol.append(li);
  }
  status("Ảnh tương tự" + (body.captions.length ? " và chú thích phù hợp" : ""));
}
$("f").addEventListener("submit", (e) => { e.preventDefault(); const q = $("q").value.trim(); if (q) search(q, 0); });
$("prev").addEventListener("click", () => search(query, Math.max(0, offset - K)));
$("next").addEventListener("click", () => search(query, offset + K));
$("file").addEventListener("change", (e) => { if (e.target.files[0]) searchImage(e.target.files[0]); });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files[0]) searchImage(e.dataTransfer.files[0]); });
"""


def main(argv: Optional[Sequence[str]] = None) -> int:
    init_logger()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", required=True, help="an index folder (launch/build_index.py)")
    p.add_argument("--model", help="default: the model the index was built with")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--backend", choices=("torch", "onnx"), default="torch",
                   help="onnx: embed with onnxruntime (export_model.py --format onnx first)")
    p.add_argument("--device", default="auto")
    p.add_argument("--vncorenlp-dir", help="VnCoreNLP model folder (default: $VNCORENLP_DIR)")
    p.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_BYTES / 2**20)
    args = p.parse_args(argv)
    try:
        service = Service(args.index, args.model, args.backend, args.device, args.vncorenlp_dir)
    except EXPECTED_ERRORS as e:
        print(f"serve: {strip_controls(one_line(e))}", file=sys.stderr)
        return 2
    import uvicorn

    app = create_app(service, int(args.max_upload_mb * 2**20))
    logger.info("serving %d images of %s on http://%s:%d/", len(service.items), args.index, args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                limit_concurrency=64, timeout_keep_alive=5, h11_max_incomplete_event_size=64 * 1024)
    return 0


if __name__ == "__main__":
    sys.exit(main())
