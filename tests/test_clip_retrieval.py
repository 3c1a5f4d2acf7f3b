"""clip-retrieval's back-end API on our service: a real server on 127.0.0.1 over two
named indices of an untrained tiny model (real embeddings of real pictures, so a picture
finds itself), asked with the exact JSON clip-retrieval's Python client and page send
(no content type, and text/plain), from another origin (CORS), with hostile bodies, an
image_url fetch from an allowed local server, and an index replaced while serving."""
from __future__ import annotations

import base64
import http.server
import importlib.util
import json
import logging
import os
import shutil
import socket
import socketserver
import threading
import time
import types
import urllib.parse
from pathlib import Path
from typing import Callable

import pytest
import requests
import torch

from conftest import make_image, static_server
from test_serve import _browser
from test_serve_hostile import _running, _settings, _tiny_model_folder

N_A, N_B = 8, 5


def _distinct(module, seed: int = 0):
    """An untrained tower maps every input to nearly one direction (cosine > 0.99 between
    any two pictures), so nothing could rank or de-duplicate. These encoders keep the
    model (its fingerprint, its preprocessing, the service's code around it) and make its
    outputs tell inputs apart: a fixed random projection of the pixels, a sum of random
    vectors of the tokens."""
    g = torch.Generator().manual_seed(seed)
    dim, size = module.config["embed_dim"], module.config["vision"].get("image_size", 224)
    pixels = torch.randn(3 * size * size, dim, generator=g)
    tokens = torch.randn(module.config["text"]["hf_config"]["vocab_size"], dim, generator=g)
    module.encode_image = lambda x: torch.nn.functional.normalize(x.flatten(1).float() @ pixels, dim=-1)
    module.encode_text = lambda ids: torch.nn.functional.normalize(tokens[ids].sum(1), dim=-1)
    return module


def _index(folder: Path, model, model_dir: Path, photos: list[Path], tag: str, m):
    """An index of `photos` embedded by `m` (phoclip.load's model), two captions each."""
    from phoclip.search.index import write_index

    items = [{"key": f"{tag}{i}", "path": str(p), "caption": f"ảnh {tag} số {i}", "shard": ""}
             for i, p in enumerate(photos)]
    caps = [{"caption": f"chú thích {tag} {i} {j}", "image": i} for i in range(len(photos)) for j in range(2)]
    write_index(folder, model, str(model_dir), m.embed_images([str(p) for p in photos]), items,
                m.embed_texts([c["caption"] for c in caps]), caps)


@pytest.fixture(scope="module")
def cr(tiny_tokenizer_dir, tmp_path_factory):
    import phoclip
    from phoclip import serve

    d = tmp_path_factory.mktemp("clip_retrieval")
    model = _tiny_model_folder(tiny_tokenizer_dir, d / "model")
    photos = [make_image(d / "photos" / f"p{i}.jpg", i, size=(64, 48)) for i in range(N_A + 3)]
    m = phoclip.load(str(d / "model"), "torch", "cpu")
    _distinct(m.module)
    _index(d / "a", model, d / "model", photos[:N_A], "a", m)
    _index(d / "b", model, d / "model", photos[N_A - 2:N_A + 3], "b", m)
    service = serve.Service([f"a={d / 'a'}", f"b={d / 'b'}"], device="cpu", images_roots=[str(d / "photos")])
    _distinct(service.model)
    with _running(service, _settings(reload_every=0.3, image_url_hosts=("127.0.0.1",))) as (app, port):
        yield types.SimpleNamespace(base=f"http://127.0.0.1:{port}", service=service, d=d, photos=photos, m=m,
                                    model=model)


def client_body(**over) -> dict:
    """What clip_retrieval.clip_client.ClipClient posts (all its fields, nulls included)."""
    body = {"text": None, "image": None, "image_url": None, "embedding_input": None, "deduplicate": True,
            "use_safety_model": True, "use_violence_detector": True, "indice_name": "a", "use_mclip": False,
            "aesthetic_score": 9, "aesthetic_weight": 0.5, "modality": "image", "num_images": 40,
            "num_result_ids": 40}
    body.update(over)
    return body


def page_body(**over) -> dict:
    """What clip-retrieval's page posts (its strings for the aesthetic fields)."""
    body = {"text": "", "image": None, "image_url": None, "embedding_input": None, "modality": "image",
            "num_images": 40, "indice_name": "a", "num_result_ids": 3000, "use_mclip": False, "deduplicate": True,
            "use_safety_model": True, "use_violence_detector": True, "aesthetic_score": "", "aesthetic_weight": "0.5"}
    body.update(over)
    return body


def _post(url, body, text_plain=False, origin=None):
    """POST `body` as clip-retrieval does: `data=json.dumps(...)`, no content type (its
    client) or text/plain (a browser's fetch of a string)."""
    headers = {}
    if text_plain:
        headers["Content-Type"] = "text/plain;charset=UTF-8"
    if origin:
        headers["Origin"] = origin
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    r = requests.post(url, data=data, headers=headers, timeout=60)
    assert text_plain or "content-type" not in {k.lower() for k in r.request.headers}
    return r


def _one_line_error(r, status) -> str:
    assert r.status_code == status, (r.status_code, r.text[:300])
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and len(detail) < 400, detail
    return detail


def test_knn_answers_clip_retrievals_client_and_page(cr):
    caption_hits = {}
    for text_plain, body in ((False, client_body(text="ảnh a số 3")), (True, page_body(text="ảnh a số 3"))):
        r = _post(cr.base + "/knn-service", body, text_plain)
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/json"), r.text[:300]
        res = json.loads(r.text, parse_constant=lambda c: pytest.fail(f"{c} in the answer"))  # strict JSON
        assert isinstance(res, list) and 0 < len(res) <= N_A
        ids = [x["id"] for x in res]
        assert len(set(ids)) == len(ids) and all(isinstance(i, int) and 0 <= i < N_A for i in ids)
        sims = [x["similarity"] for x in res]
        assert all(isinstance(s, float) for s in sims) and sims == sorted(sims, reverse=True)
        for x in res:  # the first num_images (all here) carry metadata; the picture is ours, absolute
            assert x["caption"] == f"ảnh a số {x['id']}" and x["image_path"].endswith(f"p{x['id']}.jpg")
            assert x["url"] == f"{cr.base}/photo/{x['id']}?index=a" and "image" not in x
            assert not os.path.isabs(x["image_path"])  # as recorded, never the server's own path
        caption_hits[text_plain] = ids
    assert caption_hits[False] == caption_hits[True]
    pic = requests.get(res[0]["url"], timeout=30)
    assert pic.status_code == 200 and pic.headers["content-type"] == "image/jpeg"
    # a picture finds itself: its base64 (the client's local file, the page's upload) and its stored embedding
    b64 = base64.b64encode(cr.photos[3].read_bytes()).decode()
    for body in (client_body(image=b64), page_body(image=b64), client_body(image="data:image/jpeg;base64," + b64)):
        res = _post(cr.base + "/knn-service", body).json()
        assert res[0]["id"] == 3 and res[0]["similarity"] > 0.99
    emb = cr.m.embed_images([str(cr.photos[5])])[0].tolist()
    res = _post(cr.base + "/knn-service", client_body(embedding_input=emb, num_images=2, num_result_ids=6)).json()
    assert res[0]["id"] == 5 and res[0]["similarity"] > 0.99 and len(res) == 6
    assert all("caption" in x for x in res[:2]) and all(set(x) == {"id", "similarity"} for x in res[2:])
    # a scaled embedding is normalised: the same ranking, cosine similarities
    res2 = _post(cr.base + "/knn-service", client_body(embedding_input=[3 * v for v in emb], num_images=2,
                                                       num_result_ids=6)).json()
    assert [x["id"] for x in res2] == [x["id"] for x in res] and abs(res2[0]["similarity"] - res[0]["similarity"]) < 1e-4
    # modality text searches the captions; ids are still image rows (what /metadata reads), each once
    res = _post(cr.base + "/knn-service", client_body(text="chú thích a 6 1", modality="text", num_result_ids=100)).json()
    ids = [x["id"] for x in res]
    assert len(ids) == len(set(ids)) == N_A and res[0]["caption"] == f"ảnh a số {res[0]['id']}"
    # the other index by name; its ids are its own
    res = _post(cr.base + "/knn-service", client_body(image=b64, indice_name="b")).json()
    assert len(res) == N_B and res[0]["url"].endswith("?index=b") and res[0]["caption"].startswith("ảnh b")
    assert _post(cr.base + "/knn-service", client_body(text="x", indice_name=None)).status_code == 200  # null: the first
    detail = _one_line_error(_post(cr.base + "/knn-service", client_body(text="x", indice_name="laion5B")), 404)
    assert "laion5B" in detail and "a, b" in detail


def test_deduplicate_drops_a_picture_indexed_twice(cr, tmp_path):
    """Index b holds p6 and p7 of index a; an index of the same picture twice answers it once."""
    from phoclip import serve

    twice = [cr.photos[0], cr.photos[0], cr.photos[1]]
    _index(tmp_path / "twice", cr.model, cr.d / "model", twice, "t", cr.m)
    service = serve.Service(str(tmp_path / "twice"), device="cpu")
    _distinct(service.model)
    with _running(service, _settings()) as (_, port):
        url = f"http://127.0.0.1:{port}/knn-service"
        b64 = base64.b64encode(cr.photos[0].read_bytes()).decode()
        dup = _post(url, client_body(image=b64, deduplicate=False, indice_name=None)).json()
        assert sorted(x["id"] for x in dup) == [0, 1, 2]
        res = _post(url, client_body(image=b64, deduplicate=True, indice_name=None)).json()
        assert sorted(x["id"] for x in res) in ([0, 2], [1, 2])
        assert requests.get(f"http://127.0.0.1:{port}/indices-list", timeout=10).json() == ["twice"]


def test_metadata_indices_list_and_config(cr):
    assert requests.get(cr.base + "/indices-list", timeout=10).json() == ["a", "b"]
    for text_plain in (False, True):
        r = _post(cr.base + "/metadata", {"ids": [4, 0], "indice_name": "a"}, text_plain)
        got = r.json()
        assert r.status_code == 200 and [g["id"] for g in got] == [4, 0]
        assert got[0]["metadata"]["caption"] == "ảnh a số 4" and got[0]["metadata"]["url"].endswith("/photo/4?index=a")
    assert _post(cr.base + "/metadata", {"ids": [], "indice_name": "a"}).json() == []
    assert _post(cr.base + "/metadata", {"ids": [1], "indice_name": "b"}).json()[0]["metadata"]["caption"] == "ảnh b số 1"
    _one_line_error(_post(cr.base + "/metadata", {"ids": [N_A], "indice_name": "a"}), 404)
    _one_line_error(_post(cr.base + "/metadata", {"ids": [0], "indice_name": "zz"}), 404)
    cfg = requests.get(cr.base + "/config.json", timeout=10).json()
    assert cfg == {"defaultBackend": cr.base, "defaultIndex": "", "urlColumn": "url"}


def test_cors_is_answered_for_clip_retrievals_routes_only(cr):
    origin = "http://front.example:3005"
    r = _post(cr.base + "/knn-service", page_body(text="ảnh"), text_plain=True, origin=origin)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in r.headers
    r = requests.get(cr.base + "/indices-list", headers={"Origin": origin}, timeout=10)
    assert r.headers["access-control-allow-origin"] == "*"
    # a preflight (a page that posts application/json) is answered too
    r = requests.options(cr.base + "/metadata", timeout=10, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    assert "POST" in r.headers["access-control-allow-methods"]
    # our own routes stay same-origin
    r = requests.get(cr.base + "/search?q=x", headers={"Origin": origin}, timeout=30)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


class _Pictures(http.server.BaseHTTPRequestHandler):
    """/p.jpg: a picture; /away: a redirect to another host name; /big: more than the cap."""
    picture = b""

    def do_GET(self):  # noqa: N802 -- http.server's name
        if self.path == "/away":
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{self.server.server_port}/p.jpg")
            self.end_headers()
            return
        body = self.picture if self.path == "/p.jpg" else b"\xff" * (2 << 20)
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def test_image_url_is_fetched_only_from_allowed_hosts(cr):
    handler = type("H", (_Pictures,), {"picture": cr.photos[2].read_bytes()})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    pics = f"http://127.0.0.1:{httpd.server_port}"
    try:
        res = _post(cr.base + "/knn-service", client_body(image_url=pics + "/p.jpg")).json()
        assert res[0]["id"] == 2 and res[0]["similarity"] > 0.99
        detail = _one_line_error(_post(cr.base + "/knn-service", client_body(image_url=pics + "/away")), 422)
        assert "redirected to a host not allowed (localhost)" in detail
        _one_line_error(_post(cr.base + "/knn-service", client_body(image_url=pics + "/big")), 413)  # over 1 MB
        _one_line_error(_post(cr.base + "/knn-service", client_body(image_url="file:///etc/passwd")), 403)
        _one_line_error(_post(cr.base + "/knn-service", client_body(image_url="http://example.com/a.jpg")), 403)
        # a service that was not told a host fetches nothing
        with _running(cr.service, _settings()) as (_, port):
            r = _post(f"http://127.0.0.1:{port}/knn-service", client_body(image_url=pics + "/p.jpg"))
            assert "--allow-image-url" in _one_line_error(r, 403)
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_hostile_bodies_get_one_line_4xx_and_the_service_stays_up(cr):
    url = cr.base + "/knn-service"
    nan = json.dumps(client_body(embedding_input=[0.1] * 63 + [float("nan")]))  # json.dumps writes NaN
    for body, status in (
            (client_body(text="x", num_images=10 ** 9), 422),
            (client_body(text="x", num_result_ids=0), 422),
            (nan, 400),
            (nan.replace("NaN", "1e999"), 422),  # parses to inf
            (client_body(embedding_input=[0.1] * 10), 422),
            (client_body(embedding_input=[0.0] * 64), 422),
            (client_body(embedding_input=["a"] * 64), 422),
            (client_body(text=5), 422),
            (client_body(num_images="many", text="x"), 422),
            (client_body(text="x" * 3000), 422),
            (client_body(), 422),  # no query at all
            (client_body(image="not base64 !!"), 422),
            (client_body(image=base64.b64encode(b"not a picture").decode()), 415),
            (client_body(image="A" * 1_400_000), 413),  # under the body cap, over the 1 MB upload cap once decoded
            (client_body(text="x", modality="text", indice_name="a", num_images=1) | {"indice_name": ["a"]}, 422),
            ("{not json", 400), ("[1, 2]", 422), ("[" * 100_000 + "]" * 100_000, 400), (b"\xff\xfe\x00", 400),
            ('{"num_images": 1' + "0" * 5000 + ', "text": "x"}', 400)):
        r = _post(url, body, text_plain=True)
        _one_line_error(r, status)
    for body, status in (({"ids": list(range(5000)), "indice_name": "a"}, 422), ({"ids": "0"}, 422),
                         ({"ids": [-1]}, 404), ({"ids": [True, None]}, 422), ("[]", 422)):
        _one_line_error(_post(cr.base + "/metadata", body), status)
    assert requests.get(cr.base + "/health", timeout=10).status_code == 200


def test_our_routes_take_an_index_name(cr):
    h = requests.get(cr.base + "/health", timeout=10).json()
    assert [(i["name"], i["images"], i["captions"]) for i in h["indices"]] == [("a", N_A, 2 * N_A), ("b", N_B, 2 * N_B)]
    assert h["images"] == N_A
    res = requests.get(cr.base + "/search", params={"q": "ảnh b", "k": 3, "index": "b"}, timeout=30).json()["results"]
    assert len(res) == 3 and all(r["key"].startswith("b") and r["thumb"].endswith("?index=b") for r in res)
    assert requests.get(cr.base + res[0]["thumb"], timeout=30).headers["content-type"] == "image/jpeg"
    item = requests.get(cr.base + "/items/1", params={"index": "b"}, timeout=30).json()
    assert item["key"] == "b1" and item["captions"] == ["ảnh b số 1", "chú thích b 1 0", "chú thích b 1 1"]
    like = requests.get(cr.base + "/items/1/similar", params={"index": "b", "k": 2}, timeout=30).json()["results"]
    assert len(like) == 2 and 1 not in {r["id"] for r in like}
    for path in ("/search?q=x&index=zz", f"/items/{N_B}?index=b", f"/thumb/{N_B}?index=b"):
        assert requests.get(cr.base + path, timeout=10).status_code == 404, path


def test_an_index_replaced_while_serving_is_served_without_restart(cr, caplog):
    """A new version of index b (two more pictures) is answered within the reload period;
    a version that does not open is logged and the old one keeps serving."""
    import phoclip.serve.indices

    url = cr.base + "/knn-service"
    old = requests.get(cr.base + "/health", timeout=10).json()["indices"][1]
    _index(cr.d / "b", cr.model, cr.d / "model", cr.photos[N_A - 4:N_A + 3], "b", cr.m)  # written beside, renamed over
    t0 = time.monotonic()
    while True:
        res = _post(url, client_body(text="ảnh b", indice_name="b", num_result_ids=100)).json()
        if len(res) == N_B + 2:
            break
        assert time.monotonic() - t0 < 10, "the new version was not served"
        time.sleep(0.1)
    new = requests.get(cr.base + "/health", timeout=10).json()["indices"][1]
    assert new["images"] == N_B + 2 and (new["version"] != old["version"] or new["version"] is None)
    assert requests.get(cr.base + "/photo/6?index=b", timeout=30).status_code == 200
    # a broken index.json: logged once, version b still served
    with caplog.at_level(logging.ERROR, logger=phoclip.serve.indices.__name__):
        meta = cr.d / "b" / "index.json"
        good = meta.read_bytes()
        tmp = meta.with_name("index.json.tmp")
        tmp.write_text("{broken")
        os.replace(tmp, meta)
        time.sleep(1.2)
        assert len(_post(url, client_body(text="ảnh b", indice_name="b", num_result_ids=100)).json()) == N_B + 2
        tmp.write_bytes(good)
        os.replace(tmp, meta)
    lines = [r.getMessage() for r in caplog.records  # the reload of version b above may log at INFO
             if r.name == phoclip.serve.indices.__name__ and r.levelno >= logging.ERROR]
    assert len(lines) == 1 and "index b" in lines[0] and "still serving" in lines[0], lines


def _clip_retrieval_dir() -> Path:
    """The folder holding clip-retrieval's package (clip_retrieval/, and front/build/, its
    built page): $CLIP_RETRIEVAL_DIR (`make test` installs it there) or an install; the
    test skips without it."""
    where = os.environ.get("CLIP_RETRIEVAL_DIR")
    if where:
        d = Path(where)
    else:
        spec = importlib.util.find_spec("clip_retrieval")  # found, not imported
        d = Path(spec.submodule_search_locations[0]).parent if spec else None
    if d is None or not (d / "clip_retrieval" / "clip_client.py").is_file():
        pytest.skip("clip-retrieval is not installed (pip install --no-deps --target DIR clip-retrieval; "
                    "CLIP_RETRIEVAL_DIR=DIR): the JSON its client and page send is checked above without it")
    return d


def _clip_client_module():
    """clip_retrieval/clip_client.py loaded alone (the package's __init__ imports its
    whole back end: flask, faiss, torch models)."""
    spec = importlib.util.spec_from_file_location("clip_client_under_test",
                                                  _clip_retrieval_dir() / "clip_retrieval" / "clip_client.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # needs only requests
    return mod


def test_clip_retrievals_own_client(cr):
    cc = _clip_client_module()
    client = cc.ClipClient(url=cr.base + "/knn-service", indice_name="a", num_images=3)
    res = client.query(text="ảnh a số 1")
    assert len(res) == 3 and all({"id", "similarity", "url", "caption"} <= set(r) for r in res)
    assert client.query(image=str(cr.photos[4]))[0]["id"] == 4
    emb = cr.m.embed_images([str(cr.photos[6])])[0].tolist()
    assert client.query(embedding_input=emb)[0]["id"] == 6
    text = cc.ClipClient(url=cr.base + "/knn-service", indice_name="b", modality=cc.Modality.TEXT, num_images=2)
    assert len(text.query(text="chú thích b 2 0")) == 2
    assert torch.isfinite(torch.tensor([r["similarity"] for r in res])).all()


def test_clip_retrievals_own_front_end_in_a_real_browser(cr, tmp_path):
    """clip-retrieval's built page, unchanged, served from another origin (so every call
    to us is cross-origin) with its documented config.json naming our service (what our
    /config.json answers): a Vietnamese query typed into it shows our pictures and captions,
    loaded from our /photo/ URLs, with nothing logged as an error by the page."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    build = _clip_retrieval_dir() / "front" / "build"
    assert (build / "index.html").is_file(), f"{build}: clip-retrieval's built page is missing"
    site = shutil.copytree(build, tmp_path / "front")
    (site / "config.json").write_text(requests.get(cr.base + "/config.json", timeout=10).text)
    drv = _browser(tmp_path, console=True)
    try:
        with static_server(site) as front:
            assert urllib.parse.urlsplit(front).port != urllib.parse.urlsplit(cr.base).port
            drv.get(front + "/")
            wait = WebDriverWait(drv, 60)
            # its search bar, inside the page's <clip-front> shadow root, once the index list came
            bar = wait.until(lambda d: d.execute_script(
                "const r = document.querySelector('clip-front')?.shadowRoot;"
                "return r && r.querySelector('select option[value=a]') && r.getElementById('searchBar')"))
            bar.send_keys("ảnh a số 3", Keys.ENTER)
            shown = wait.until(lambda d: d.execute_script(_PICTURES) or None)
            assert len(shown) == N_A, shown  # every picture of index a, each once (duplicates hidden)
            ids = set()
            for src, title, caption, loaded in shown:
                u = urllib.parse.urlsplit(src)
                assert f"{u.scheme}://{u.netloc}" == cr.base and u.path.startswith("/photo/") and u.query == "index=a"
                i = int(u.path.rsplit("/", 1)[1])
                assert title == caption == f"ảnh a số {i}" and loaded, (src, title, caption, loaded)
                ids.add(i)
            assert ids == set(range(N_A))
            assert "query=" in drv.current_url and "back=" in drv.current_url  # its own state, as it keeps it
            drv.find_element(By.TAG_NAME, "clip-front")  # still the page we opened
            # the wheel ships without vendor/webcomponents-loader.js (a polyfill Chromium does
            # not need) and there is no favicon: the page's own 404s for files it lacks are its own
            missing = lambda m: m.startswith(front + "/") and not (site / m[len(front) + 1:].split()[0]).exists()  # noqa: E731
            errors = [e for e in drv.get_log("browser") if e["level"] == "SEVERE" and not missing(e["message"])]
            assert not errors, errors
    finally:
        drv.quit()


# the page's results: [src, title, caption, loaded] of each picture once it has loaded or failed
_PICTURES = """
const r = document.querySelector('clip-front').shadowRoot;
const figs = [...r.querySelectorAll('#products figure')];
if (!figs.length || figs.some(f => !f.querySelector('img.pic').complete)) return null;
return figs.map(f => { const i = f.querySelector('img.pic');
  return [i.src, i.title, f.querySelector('figcaption').textContent.trim(), i.naturalWidth > 0]; });
"""


class _Raw(socketserver.BaseRequestHandler):
    """Whatever `reply` says, then the connection closed: not HTTP, or a drip."""
    reply: "Callable[[socket.socket], None]" = staticmethod(lambda s: s.sendall(b"garbage\r\n\r\n"))

    def handle(self):
        try:
            self.request.recv(4096)
            self.reply(self.request)
        except OSError:  # the client gave up
            pass


def _raw_server(reply) -> socketserver.ThreadingTCPServer:
    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), type("R", (_Raw,), {"reply": staticmethod(reply)}))
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def test_image_url_that_is_not_http_or_not_a_url_is_refused_in_one_line():
    """A reply that is not HTTP and a URL http.client refuses (a port with a quoted slash,
    control characters) are 422 in one line, not an internal error."""
    from phoclip.serve.uploads import Refused, fetch_image_url

    srv = _raw_server(lambda s: s.sendall(b"garbage\r\n\r\n"))
    port = srv.server_address[1]
    try:
        for url in (f"http://127.0.0.1:{port}/p.jpg", f"http://127.0.0.1:{port}%2f@127.0.0.1/",
                    f"http://127.0.0.1:{port}/\r\nX-Injected: 1"):
            with pytest.raises(Refused) as e:
                fetch_image_url(url, ["127.0.0.1"], 1 << 20, timeout=5)
            assert e.value.status == 422 and e.value.detail.startswith("image_url: not fetched") and "\n" not in e.value.detail
    finally:
        srv.shutdown()
        srv.server_close()


def _drip(head: bytes):
    def reply(s: socket.socket) -> None:
        s.sendall(head)
        for _ in range(200):  # a byte every 0.1 s: each read is quick, the whole never ends
            s.sendall(b"x")
            time.sleep(0.1)
    return reply


@pytest.mark.parametrize("head", [b"HTTP/1.0 200 OK\r\nX-Slow: ", b"HTTP/1.0 200 OK\r\nContent-Length: 100000\r\n\r\n"])
def test_image_url_that_drips_is_cut_at_the_fetch_deadline(head):
    """Headers or a body sent a byte at a time (each read within the socket timeout) hold
    the worker no longer than the fetch's timeout."""
    from phoclip.serve.uploads import Refused, fetch_image_url

    srv = _raw_server(_drip(head))
    try:
        t = time.monotonic()
        with pytest.raises(Refused) as e:
            fetch_image_url(f"http://127.0.0.1:{srv.server_address[1]}/p.jpg", ["127.0.0.1"], 1 << 20, timeout=1.0)
        assert time.monotonic() - t < 3, time.monotonic() - t
        assert e.value.status == 422 and e.value.detail == "image_url: not fetched within 1 s"
    finally:
        srv.shutdown()
        srv.server_close()
