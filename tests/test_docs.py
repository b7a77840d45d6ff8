"""The docs as a reader gets them: the site built by `mkdocs build --strict`, opened in Debian's chromium
(Playwright, as tests/test_ui.py drives it) with every request outside the local server refused, and the
text of README, docs/, conf/ and the figures' titles free of the project's own history."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, free_port
from test_ui import CHROMIUM_ARGS, TIMEOUT_MS, chromium

# what the product's text never says (the workplace's history belongs in CHANGELOG.md's commits, not in pages)
FORBIDDEN = {
    "an issue number": re.compile(r"\bissues? ?#?\d+", re.I),
    "engineers": re.compile(r"\bengineers?\b", re.I),
    "a load average": re.compile(r"\bload averages?\b", re.I),
    "an absolute path of a machine": re.compile(r"(?<![\w.])/(?:tmp|work|root|home)/"),
}


def forbidden_in(text: str) -> list[str]:
    return [
        f"{what}: {m.group(0)!r} in ...{text[max(0, m.start() - 40) : m.end() + 40]!r}..."
        for what, pattern in FORBIDDEN.items()
        for m in pattern.finditer(text)
    ]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """`mkdocs build --strict` into a temporary folder: a broken link, anchor or nav entry, a page the hooks
    cannot generate, or a warning of any kind fails the build."""
    pytest.importorskip("mkdocs", reason="mkdocs is in the docs extra")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"mkdocs build --strict exited {proc.returncode}\n{proc.stderr[-6000:]}"
    return out


def test_site_builds_strictly_with_its_generated_pages(site):
    config = (site / "reference" / "config" / "index.html").read_text()
    # every key of conf/train.yaml, with its default and the comment beside it
    assert "trainer.log_every_examples" in config and "1200" in config
    assert "a train/loss point every 1200 examples" in config
    assert "optimizer=rmsprop" in config and "keras calls this rho" in config
    cli = (site / "reference" / "cli" / "index.html").read_text()
    assert "Config groups" in cli and "sgd_momentum" in cli
    notebook = (site / "notebook" / "index.html").read_text()
    assert "A ball past a local minimum" in notebook and "notebook_files/" in notebook
    assert list((site / "notebook_files").glob("*.png")), "the notebook's figures are not in the site"
    assert (site / "search" / "search_index.json").stat().st_size > 10_000


def test_no_page_or_figure_title_tells_the_projects_history(site):
    """README, the docs' sources and the built pages (the generated ones included), conf/'s comments and the
    titles the report code wrote into the figures (the PNG's Title) speak of the product only."""
    from PIL import Image

    problems = []
    sources = [
        ROOT / "README.md",
        *(ROOT / "docs").rglob("*.md"),
        *(ROOT / "conf").rglob("*.yaml"),
        ROOT / "notebooks" / "chapter2.py",
    ]
    for path in sources:
        problems += [f"{path.relative_to(ROOT)}: {p}" for p in forbidden_in(path.read_text())]
    for page in site.rglob("*.html"):
        text = re.sub(r"<[^>]+>", " ", page.read_text())  # the text a reader sees, not the theme's markup
        problems += [f"site/{page.relative_to(site)}: {p}" for p in forbidden_in(text)]
    titled = {}
    for png in (ROOT / "docs").rglob("*.png"):
        title = Image.open(png).text.get("Title")
        if title is not None:
            titled[png.relative_to(ROOT).as_posix()] = title
            problems += [f"{png.relative_to(ROOT)} title: {p}" for p in forbidden_in(title)]
    assert not problems, "\n".join(problems)
    # the study figure this site shows first carries its title as the report code writes it now
    assert titled.get("docs/studies/gd_vs_sgd.png", "").startswith("Sweep gd_vs_sgd-"), titled


def test_the_site_in_a_browser_home_study_and_search(site, tmp_path):
    """Debian's chromium on the built site over a local HTTP server: the home page, the study page with its
    figure drawn, and the search box finding a word; any request that leaves the server (a web font, a CDN)
    is refused and fails the test. Screenshots: DESCENT_DOCS_SCREENSHOTS names a folder, else the test's own."""
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
    executable = chromium()
    shots = Path(os.environ["DESCENT_DOCS_SCREENSHOTS"]) if os.environ.get("DESCENT_DOCS_SCREENSHOTS") else tmp_path
    shots.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-u", "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(site)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert "Serving HTTP" in server.stdout.readline()  # the event: it listens
        base = f"http://127.0.0.1:{port}"
        outside = []
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.set_default_timeout(TIMEOUT_MS)

                def only_local(route):
                    if route.request.url.startswith(base):
                        route.continue_()
                    else:
                        outside.append(route.request.url)
                        route.abort()

                page.route("**/*", only_local)

                page.goto(base + "/")
                assert page.title().startswith("descent")
                heading = page.locator("article h1").first  # its text ends with the permalink's ¶
                assert heading.inner_text().startswith("descent")
                page.locator("article a[href='getting-started/']").first.wait_for()
                assert page.locator("article img[src$='gd_vs_sgd.png']").count() == 1
                page.screenshot(path=str(shots / "docs_home.png"))

                page.goto(base + "/studies/gd_vs_sgd/")
                assert page.locator("article h1").first.inner_text().startswith("Batch gradient descent against SGD")
                figure = page.locator("img[src$='gd_vs_sgd.png']")
                figure.wait_for()
                figure.scroll_into_view_if_needed()
                page.wait_for_function("img => img.complete && img.naturalWidth > 1000", arg=figure.element_handle())
                assert page.get_by_role("table").count() >= 3
                page.screenshot(path=str(shots / "docs_study.png"))

                box = page.locator("input.md-search__input")  # the header's search box (lunr, in the page)
                box.click()
                box.press_sequentially("momentum")
                results = page.locator(".md-search-result__item")
                results.first.wait_for()
                assert results.count() >= 2
                assert "momentum" in results.first.inner_text().lower()
                page.screenshot(path=str(shots / "docs_search.png"))
            finally:
                browser.close()
        assert not outside, f"the site asked for something outside it: {outside}"
    finally:
        server.terminate()
        server.wait(timeout=30)
