"""The static gallery (`launch/search.py --html`) looks like the search page: its style
sheet inlined, the same cards; every index text written as text."""
from conftest import make_image


def test_the_gallery_is_the_page_without_a_server(tmp_path):
    from phoclip.search.gallery import page_style, write_gallery
    from phoclip.search.index import Match

    photo = make_image(tmp_path / "a.jpg", 0, size=(90, 60))
    hostile = "<b>đậm</b><script>alert(1)</script>"
    hits = [Match(r + 1, 0.5 - r / 10, r, {"path": str(photo), "key": f"k{r}", "caption": hostile + f" ảnh {r}"})
            for r in range(3)]
    hits.append(Match(4, 0.1, 3, {"path": str(tmp_path / "gone.jpg"), "key": "gone", "caption": "mất"}))
    out = write_gallery(tmp_path / "g.html", ["chó <i>", "rỗng"], [hits, []])
    page = out.read_text(encoding="utf-8")
    assert page_style() in page and ".card" in page_style()  # the page's own style sheet
    assert page.count("<figure class='card'") == 4 and page.count("data:image/jpeg;base64,") == 3  # a missing file: no picture
    assert "<b>" not in page and "<script>" not in page and "&lt;b&gt;đậm" in page and "«chó &lt;i&gt;»" in page
    assert "Không có kết quả" in page and f"data-src='{photo}'" in page
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically, nothing left beside it
