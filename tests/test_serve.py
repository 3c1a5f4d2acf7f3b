"""The search service: a real server on 127.0.0.1 over an index of a tiny trained model,
queried over real sockets, attacked with hostile requests, and used in a real browser
(headless Chromium through its driver)."""
import io
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import phoclip
from http_utils import multipart
from PIL import Image
from phoclip.search.metadata import ensure_arrow

from conftest import ROOT, run_torchrun, serve_command, train_overrides

pytestmark = pytest.mark.slow
ARTIFACTS = ROOT / "test-artifacts"
PAYLOAD = "<b>đậm</b><img src=x onerror=\"document.title='pwned'\">"
TAGS = ["hình tròn", "hình vuông", "hình tam giác", "màu đỏ", "màu xanh lá", "màu vàng"]


@pytest.fixture(scope="module")
def served(shapes_shards, tmp_path_factory):
    shards, tok, n = shapes_shards
    d = tmp_path_factory.mktemp("serve")
    run = d / "run"
    run_torchrun(2, "launch/train_ddp.py", ["--config", "launch/configs/tiny-debug.yaml", *train_overrides(
        shards, tok, n, run, **{"train.max_steps": 60, "train.log_every": 20, "train.save_every": 1000,
                                "data.batch_size": 16, "optim.lr_text": 2e-3, "optim.lr_image": 2e-3})],
                 timeout=600)
    idx = d / "index"
    r = subprocess.run([sys.executable, "launch/build_index.py", "--model", str(run), "--shards",
                        f"{shards}/val-000000.tar", "--out", str(idx)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    index = phoclip.open_index(idx)
    items = index.items_for("images", range(index.count("images")))
    # every caption carries markup: the page must show it as text, never run it. Put there
    # as a user changes metadata: each part's parquet edited, then the index merged again
    # (a new version, its Arrow copies made current)
    parquets = sorted((idx / "metadata").glob("metadata_*.parquet"))
    assert parquets and sum(pq.read_metadata(f).num_rows for f in parquets) == len(items)
    for f in parquets:
        _mark_captions(f)
    r = subprocess.run([sys.executable, "launch/build_index.py", "--model", str(run), "--out", str(idx), "--merge"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert phoclip.open_index(idx).version != index.version and not any(map(ensure_arrow, parquets))
    (d / "tags.txt").write_text("\n".join(TAGS) + "\n", encoding="utf-8")
    with serve_command(["--index", idx, "--max-upload-mb", "1", "--tags", d / "tags.txt", "--images-root", shards],
                       d / "serve.log") as base:
        yield base, idx, items, shards


def _mark_captions(parquet):
    """PAYLOAD before every caption of a metadata parquet, its other columns and its
    key-value entries (how the part was made) kept."""
    pf = pq.ParquetFile(parquet)
    t = pf.read()
    caps = pa.array([PAYLOAD + (c or "") for c in t.column("caption").to_pylist()], pa.string())
    t = t.set_column(t.schema.get_field_index("caption"), "caption", caps)
    kv = {k: v for k, v in (pf.metadata.metadata or {}).items() if k != b"ARROW:schema"}
    pq.write_table(t.replace_schema_metadata(kv), parquet)


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def _post(url, fields: dict, files: dict):
    data, ctype = multipart(fields, files)
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _val_images(shards, n=3):
    import tarfile

    with tarfile.open(shards / "val-000000.tar") as tf:
        return [tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith(".jpg")][:n]


def test_api_search_page_thumbnails_image_search_and_tags(served):
    base, idx, items, shards = served
    code, _, body = _get(base + "/health")
    h = json.loads(body)
    assert code == 200 and h["images"] == len(items) and h["captions"] > 0
    q = urllib.parse.quote("hai hình tròn màu đỏ")
    code, _, body = _get(f"{base}/search?q={q}&k=5")
    page1 = json.loads(body)["results"]
    assert code == 200 and [r["rank"] for r in page1] == [1, 2, 3, 4, 5]
    assert page1[0]["score"] >= page1[-1]["score"] and page1[0]["caption"].startswith(PAYLOAD)
    code, _, body = _get(f"{base}/search?q={q}&k=5&offset=5")
    page2 = json.loads(body)["results"]
    assert [r["rank"] for r in page2] == [6, 7, 8, 9, 10] and not {r["id"] for r in page1} & {r["id"] for r in page2}
    code, headers, body = _get(base + page1[0]["thumb"])
    assert code == 200 and headers["Content-Type"] == "image/jpeg" and Image.open(io.BytesIO(body)).size[0] > 0
    # image -> image: an indexed picture finds itself first; image -> text: captions
    jpg = _val_images(shards, 1)[0]
    code, res = _post(base + "/search/image", {"k": "3"}, {"file": ("a.jpg", jpg)})
    assert code == 200 and res["images"][0]["score"] > 0.99 and len(res["captions"]) == 3
    code, res = _post(base + "/tags", {"tags": "hình tròn\nhình vuông\ntam giác", "k": "2"}, {"file": ("a.jpg", jpg)})
    assert code == 200 and len(res["tags"]) == 2 and res["tags"][0]["score"] >= res["tags"][1]["score"]
    code, res = _post(base + "/tags", {"tags": "hình tròn\nhình vuông", "id": "0"}, {})
    assert code == 200 and {t["tag"] for t in res["tags"]} == {"hình tròn", "hình vuông"}
    # what the page asks: the vocabulary, an item's captions and source, more like it, a larger photo
    assert json.loads(_get(base + "/tags")[2]) == {"tags": TAGS}
    assert h["backend"] == "torch" and h["dim"] == 64 and h["index_bytes"] > h["images"] * 64 and h["skipped"] == 0
    code, _, body = _get(base + "/items/0")
    item = json.loads(body)
    assert code == 200 and item["captions"][0] == PAYLOAD + items[0]["caption"] and len(item["captions"]) >= 2
    assert len({" ".join(c.split()).casefold() for c in item["captions"]}) == len(item["captions"])  # distinct
    assert item["source"] and item["photo"] == "/photo/0" and item["shard"] == "val-000000.tar" and item["path"] == ""
    code, _, body = _get(base + "/items/0/similar?k=5")
    like = json.loads(body)["results"]
    assert code == 200 and [r["rank"] for r in like] == [1, 2, 3, 4, 5] and 0 not in {r["id"] for r in like}
    code, _, body = _get(base + "/items/0/similar?k=5&offset=5")
    assert [r["rank"] for r in json.loads(body)["results"]] == [6, 7, 8, 9, 10]
    code, headers, body = _get(base + "/photo/0")
    assert code == 200 and headers["Content-Type"] == "image/jpeg" and Image.open(io.BytesIO(body)).size[0] > 0
    for path in (f"/items/{len(items)}", f"/items/{len(items)}/similar", f"/photo/{len(items)}", "/items/-1"):
        assert _get(base + path)[0] == 404, path


def test_hostile_requests_get_4xx_and_the_service_stays_up(served):
    base, idx, items, shards = served
    # over --max-upload-mb 1: answered from the header and the connection closed, so a client
    # still sending the body may meet a closed socket: asked on a raw socket (no race)
    import socket

    host, port = base.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /search/image HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                  b"Content-Type: multipart/form-data; boundary=b\r\n\r\n" % (2 * 1024 * 1024))
        assert s.recv(4096).startswith(b"HTTP/1.1 413")
    code, _ = _post(base + "/search/image", {}, {"file": ("notes.jpg", "không phải ảnh".encode())})
    assert code == 415
    code, _ = _post(base + "/search/image", {}, {"file": ("cut.jpg", _val_images(shards, 1)[0][:300])})
    assert code == 422
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, format="PNG")  # 400M pixels in a small file
    code, _ = _post(base + "/search/image", {}, {"file": ("bomb.png", bomb.getvalue())})
    assert code == 422
    for path in ("/thumb/../../etc/passwd", "/thumb/..%2F..%2Fetc%2Fpasswd", "/thumb/%2Fetc%2Fpasswd",
                 f"/thumb/{len(items)}", "/thumb/-1", "/thumb/0.5", "/../etc/passwd"):
        code, _, body = _get(base + path)
        assert 400 <= code < 500 and b"root:" not in body, (path, code)
    code, _, _ = _get(base + "/search?q=" + "a" * 100_000)
    assert 400 <= code < 500
    for bad in ("k=0", "k=100000", "offset=-1", "k=abc", ""):
        code, _, _ = _get(f"{base}/search?q=xe&{bad}" if bad else f"{base}/search")
        assert 400 <= code < 500, bad
    code, _ = _post(base + "/tags", {"tags": "a"}, {})
    assert code == 422
    req = urllib.request.Request(base + "/search/image", data=b"--x\r\ngarbage", method="POST",
                                 headers={"Content-Type": "multipart/form-data; boundary=x"})
    try:
        urllib.request.urlopen(req, timeout=30)
        code = 200
    except urllib.error.HTTPError as e:
        code = e.code
    assert 400 <= code < 500
    code, headers, _ = _get(base + "/")
    assert code == 200 and "script-src 'self'" in headers["Content-Security-Policy"]
    assert _get(base + "/health")[0] == 200  # nothing above took it down


def _browser(tmp_path, console: bool = False):
    """Headless Chromium through its driver (skips without them); `console`: its console
    log kept for `get_log("browser")`."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("Debian's chromium + chromium-driver are not installed (make test installs them as root)")
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium fetch a browser
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-quic", f"--user-data-dir={tmp_path / 'chrome'}", "--window-size=1200,900"):
        opts.add_argument(a)
    if console:
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=opts)


def _query(drv) -> dict:
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(drv.current_url).query))


def _thumbs_loaded(drv) -> bool:
    return drv.execute_script("const t = [...document.querySelectorAll('#grid img.thumb')];"
                              "return t.length >= 5 && t.every(i => i.complete && i.naturalWidth > 0)")


def test_the_page_in_a_real_browser(served, tmp_path):
    """Search, paging and the back button, a shared URL, the detail view (captions, tags,
    more like this, keyboard), an uploaded query with its preview, a phone-sized window;
    captions written as text throughout. Screenshots land in test-artifacts/."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    base, idx, items, shards = served
    q = "hai hình tròn màu đỏ"
    ARTIFACTS.mkdir(exist_ok=True)
    drv = _browser(tmp_path)
    wait = WebDriverWait(drv, 60)
    status = lambda d: d.find_element(By.ID, "status").text  # noqa: E731
    try:
        # the empty state says what to try: the tag vocabulary, each a link that searches it
        drv.get(base + "/")
        assert "PhoCLIP" in drv.title
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#suggest a.tag")) == len(TAGS))
        assert drv.find_element(By.ID, "empty").is_displayed() and "ảnh" in drv.find_element(By.ID, "meta").text
        # "/" puts the cursor in the search box; Enter searches; the query goes into the URL
        ActionChains(drv).send_keys("/").perform()
        assert drv.switch_to.active_element.get_attribute("id") == "q"
        drv.switch_to.active_element.send_keys(q, Keys.ENTER)
        wait.until(lambda d: "Kết quả 1–24" in status(d) and _thumbs_loaded(d))
        assert _query(drv) == {"q": q}
        figs = drv.find_elements(By.CSS_SELECTOR, "#grid figcaption")
        assert len(figs) == 24 and all(PAYLOAD in f.text for f in figs)  # shown as text...
        assert not drv.find_elements(By.CSS_SELECTOR, "#grid b, #grid img:not(.thumb)")  # ...never as markup
        ids = [int(a.get_attribute("data-id")) for a in drv.find_elements(By.CSS_SELECTOR, "#grid figure a")]
        assert len(set(ids)) == len(ids)
        drv.save_screenshot(str(ARTIFACTS / "serve_page.png"))
        # paging, and the back button walks back through it
        drv.find_element(By.ID, "next").click()
        wait.until(lambda d: "Kết quả 25–" in status(d))
        assert _query(drv) == {"q": q, "p": "1"}
        drv.back()
        wait.until(lambda d: "Kết quả 1–24" in status(d) and _query(d) == {"q": q})
        # the detail view: a larger photo, every caption (as text), tags, its source
        drv.find_elements(By.CSS_SELECTOR, "#grid figure a")[0].click()
        wait.until(lambda d: d.execute_script("return document.getElementById('detail').open"))
        assert _query(drv) == {"q": q, "item": str(ids[0])}
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#d-captions li")) >= 2
                   and len(d.find_elements(By.CSS_SELECTOR, "#d-tags a.tag")) == 5
                   and d.execute_script("const i = document.getElementById('d-photo');"
                                        "return i.complete && i.naturalWidth > 0"))
        caps = [li.text for li in drv.find_elements(By.CSS_SELECTOR, "#d-captions li")]
        assert caps[0].startswith(PAYLOAD) and len(set(caps)) == len(caps)
        assert {a.text.split()[0] for a in drv.find_elements(By.CSS_SELECTOR, "#d-tags a.tag")} <= {
            w for t in TAGS for w in t.split()}
        assert not drv.find_elements(By.CSS_SELECTOR, "#detail b") and drv.title != "pwned"
        assert items[ids[0]]["key"] in drv.find_element(By.ID, "d-source").text
        drv.save_screenshot(str(ARTIFACTS / "serve_detail.png"))
        # → shows the next result; Esc closes, and the URL follows
        drv.switch_to.active_element.send_keys(Keys.ARROW_RIGHT)
        wait.until(lambda d: _query(d).get("item") == str(ids[1]))
        drv.switch_to.active_element.send_keys(Keys.ESCAPE)
        wait.until(lambda d: not d.execute_script("return document.getElementById('detail').open"))
        assert _query(drv) == {"q": q}
        # a shared URL opens the same results and the same detail view
        drv.get(f"{base}/?{urllib.parse.urlencode({'q': q, 'item': ids[2]})}")
        wait.until(lambda d: d.execute_script("return document.getElementById('detail').open")
                   and "Kết quả 1–24" in status(d) and len(d.find_elements(By.CSS_SELECTOR, "#d-tags a.tag")) == 5)
        assert items[ids[2]]["key"] in drv.find_element(By.ID, "d-title").text
        # more like this: image → image from that item, the item itself left out; back returns
        drv.find_element(By.ID, "d-similar").click()
        wait.until(lambda d: _query(d) == {"like": str(ids[2])} and "Ảnh giống" in status(d) and _thumbs_loaded(d))
        like = [int(a.get_attribute("data-id")) for a in drv.find_elements(By.CSS_SELECTOR, "#grid figure a")]
        assert ids[2] not in like and len(like) == 24
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#query-tags a.tag")) == 5)
        assert not drv.find_element(By.ID, "detail").get_attribute("open")
        drv.back()
        wait.until(lambda d: _query(d) == {"q": q, "item": str(ids[2])}
                   and d.execute_script("return document.getElementById('detail').open")
                   and len(d.find_elements(By.CSS_SELECTOR, "#d-tags a.tag")) == 5)
        # a tag is a search
        drv.find_elements(By.CSS_SELECTOR, "#d-tags a.tag")[0].click()
        wait.until(lambda d: "Kết quả 1–24" in status(d) and _query(d).get("q") in TAGS)
        # search by image through the file input (what a drop does): its preview, tags, captions
        img = tmp_path / "query.jpg"
        img.write_bytes(_val_images(shards, 1)[0])
        drv.find_element(By.ID, "file").send_keys(str(img))
        wait.until(lambda d: "Ảnh tương tự" in status(d) and len(d.find_elements(By.CSS_SELECTOR, "#query-tags a.tag")) == 5)
        assert drv.execute_script("const i = document.getElementById('preview');"
                                  "return i.src.startsWith('blob:') && i.complete && i.naturalWidth > 0")
        found = [li.find_element(By.TAG_NAME, "a").text for li in drv.find_elements(By.CSS_SELECTOR, "#captions li")]
        assert 1 <= len(found) <= 5 and len(set(found)) == len(found)
        drv.back()  # back to the tag's results
        wait.until(lambda d: "Kết quả 1–24" in status(d) and _query(d).get("q") in TAGS)
        assert not drv.find_element(By.ID, "query").is_displayed()
        # past the last result: said, with nothing to page on to
        drv.get(f"{base}/?{urllib.parse.urlencode({'q': q, 'p': 41})}")
        wait.until(lambda d: f"Không còn kết quả cho «{q}»" in status(d))
        assert not drv.find_elements(By.CSS_SELECTOR, "#grid figure") and not drv.find_element(By.ID, "next").is_displayed()
        # a phone: one column of controls, nothing wider than the screen
        drv.set_window_size(390, 844)
        drv.get(f"{base}/?{urllib.parse.urlencode({'q': q})}")
        wait.until(lambda d: "Kết quả 1–24" in status(d) and _thumbs_loaded(d))
        assert drv.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        drv.save_screenshot(str(ARTIFACTS / "serve_phone.png"))
    finally:
        drv.quit()
    for name in ("serve_page.png", "serve_detail.png", "serve_phone.png"):
        assert (ARTIFACTS / name).stat().st_size > 10_000, name
