"""`smpo evaluate` and `smpo compare` on hand-made folders and score tables (no diffusion model)."""

import json
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from smpo.cli import main
from smpo.evaluation.compare import compare
from smpo.evaluation.evaluate import evaluate_folder, parse_scorer_paths
from smpo.evaluation.manifest import ImageRecord, image_file, write_manifest


class Brightness:
    """A stand-in scorer: the mean pixel value / 255. Counts the images it scores."""

    name = "brightness"
    scale = "mean pixel / 255"

    def __init__(self):
        self.scored = 0

    def __call__(self, images, prompts):
        assert len(images) == len(prompts)
        self.scored += len(images)
        return torch.tensor([np.asarray(im, dtype=np.float64).mean() / 255 for im in images])


def _folder(root, name, grey_levels, prompts=None, seeds=None):
    """A generated folder by hand: one flat grey image per prompt."""
    folder = root / name
    prompts = prompts or [f"p{i}" for i in range(len(grey_levels))]
    records = []
    for i, level in enumerate(grey_levels):
        path = folder / image_file(i, 0)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (level, level, level)).save(path)
        records.append(ImageRecord(image_file(i, 0), i, 0, 0 if seeds is None else seeds[i], prompts[i]))
    write_manifest(folder, records)
    return folder


def test_evaluate_scores_every_image_and_resumes(tmp_path):
    folder = _folder(tmp_path, "model", [0, 51, 102, 255, 204])
    scorer = Brightness()
    table, summary = evaluate_folder(folder, ["brightness"], loaded={"brightness": scorer}, chunk_size=2,
                                     num_resamples=200, progress=False)
    assert table["brightness"].tolist() == pytest.approx([0.0, 0.2, 0.4, 1.0, 0.8])
    assert scorer.scored == 5
    row = summary.set_index("scorer").loc["brightness"]
    assert row["median"] == pytest.approx(0.4) and row["mean"] == pytest.approx(0.48)  # 2.4 / 5
    out = folder / "evaluation"
    assert pd.read_csv(out / "scores.csv")["brightness"].tolist() == pytest.approx([0.0, 0.2, 0.4, 1.0, 0.8])
    assert json.loads((out / "summary.json").read_text())["brightness"]["median"] == pytest.approx(0.4)
    assert json.loads((out / "evaluation.json").read_text())["scorers"]["brightness"]["scale"] == "mean pixel / 255"

    parts = sorted((out / "parts" / "brightness").iterdir())
    assert len(parts) == 3  # chunks of 2, 2, 1
    parts[1].unlink()  # as if killed before the second piece was written
    again = Brightness()
    table, _ = evaluate_folder(folder, ["brightness"], loaded={"brightness": again}, chunk_size=2,
                               num_resamples=200, progress=False)
    assert again.scored == 2
    assert table["brightness"].tolist() == pytest.approx([0.0, 0.2, 0.4, 1.0, 0.8])


def test_evaluate_refuses_a_scorer_path_change_and_unused_paths(tmp_path):
    folder = _folder(tmp_path, "model", [0, 255])
    evaluate_folder(folder, ["brightness"], loaded={"brightness": Brightness()}, num_resamples=10, progress=False)
    with pytest.raises(ValueError, match="brightness scores from path None, now '/elsewhere'"):
        evaluate_folder(folder, ["brightness"], scorer_paths={"brightness": "/elsewhere"},
                        loaded={"brightness": Brightness()}, progress=False)
    with pytest.raises(ValueError, match=r"scorer path given for \['clip'\]"):
        evaluate_folder(folder, ["brightness"], scorer_paths={"clip": "/x"}, progress=False)
    assert parse_scorer_paths(["pickscore=/a=b", "clip=/c"]) == {"pickscore": "/a=b", "clip": "/c"}
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse_scorer_paths(["pickscore"])


def _evaluated(root, name, scores, prompts=None, seeds=None):
    folder = _folder(root, name, [0] * len(scores), prompts=prompts, seeds=seeds)
    fixed = iter(scores)

    class Fixed(Brightness):
        def __call__(self, images, prompts):
            return torch.tensor([next(fixed) for _ in images], dtype=torch.float64)

    evaluate_folder(folder, ["pickscore"], loaded={"pickscore": Fixed()}, num_resamples=50, progress=False)
    return folder


def test_win_rates_on_hand_made_scores(tmp_path):
    a = _evaluated(tmp_path, "A", [21.0, 22.0, 23.0, 24.0])
    b = _evaluated(tmp_path, "B", [20.0, 22.0, 25.0, 21.0])
    c = _evaluated(tmp_path, "C", [30.0, 30.0, 30.0, 30.0])
    files = compare([a, b, c], tmp_path / "report", num_resamples=300)
    rates = pd.read_csv(files["winrates"]).set_index(["model_a", "model_b"])
    # A vs B: win, tie, loss, win -> (2 + 0.5) / 4; A vs C: all losses; B vs C: all losses
    assert rates.loc[("A", "B"), "win_rate"] == 0.625
    assert (rates.loc[("A", "B"), "wins"], rates.loc[("A", "B"), "ties"]) == (2, 1)
    assert rates.loc[("A", "C"), "win_rate"] == 0.0 and rates.loc[("B", "C"), "win_rate"] == 0.0
    assert rates.loc[("A", "C"), ["win_rate_low", "win_rate_high"]].tolist() == [0.0, 0.0]
    assert 0.0 <= rates.loc[("A", "B"), "win_rate_low"] <= 0.625 <= rates.loc[("A", "B"), "win_rate_high"] <= 1.0
    table = pd.read_csv(files["table_csv"]).set_index("model")
    assert table.loc["B", "pickscore WR"] == 62.5
    assert np.isnan(table.loc["A", "pickscore WR"])  # no win rate against itself, as Table 2's "-"
    assert table.loc["A", "pickscore median"] == 22.5 and table.loc["B", "pickscore median"] == 21.5
    assert table.loc["B", "pickscore mean"] == 22.0
    markdown = files["table_md"].read_text()
    assert "| B | 21.50 | 62.5 [" in markdown and "| A | 22.50 | - |" in markdown
    scaled = compare([a, b], tmp_path / "scaled", display_scale={"pickscore": 0.01}, num_resamples=50)
    assert pd.read_csv(scaled["table_csv"]).set_index("model").loc["A", "pickscore median"] == pytest.approx(0.225)


def test_mismatched_prompt_sets_are_named(tmp_path):
    a = _evaluated(tmp_path, "A", [1.0, 2.0, 3.0, 4.0])
    short = _evaluated(tmp_path, "short", [1.0, 2.0, 3.0])
    other = _evaluated(tmp_path, "other", [1.0, 2.0, 3.0, 4.0], prompts=["p0", "a cat", "p2", "p3"])
    seeds = _evaluated(tmp_path, "seeds", [1.0, 2.0, 3.0, 4.0], seeds=[0, 0, 5, 0])
    with pytest.raises(ValueError, match=r"short lacks 1 image\(s\) of A: prompt 3 image 0 \('p3'\)"):
        compare([a, short], tmp_path / "r1")
    with pytest.raises(ValueError, match=r"differ in prompt, first prompt 1 image 0: 'p1' in A, 'a cat' in other"):
        compare([a, other], tmp_path / "r2")
    with pytest.raises(ValueError, match=r"differ in seed, first prompt 2 image 0: 0 in A, 5 in seeds"):
        compare([a, seeds], tmp_path / "r3")
    assert main(["compare", str(a), str(short), "--out", str(tmp_path / "r4")]) == 2


def test_compare_refuses_to_overwrite_a_report(tmp_path):
    a = _evaluated(tmp_path, "A", [1.0, 2.0])
    b = _evaluated(tmp_path, "B", [2.0, 1.0])
    compare([a, b], tmp_path / "report", num_resamples=20)
    with pytest.raises(FileExistsError, match="--overwrite"):
        compare([a, b], tmp_path / "report", num_resamples=20)
    compare([a, b], tmp_path / "report", num_resamples=20, overwrite=True)


class _Page(HTMLParser):
    """Collects the text of each table's header cells and the sources of the images."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self._table, self._in_th = {}, [], None, False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = attrs.get("id")
            self.tables[self._table] = []
        elif tag == "th":
            self._in_th = True
        elif tag == "img":
            self.images.append(attrs["src"])

    def handle_endtag(self, tag):
        if tag == "th":
            self._in_th = False

    def handle_data(self, data):
        if self._in_th and self._table is not None:
            self.tables[self._table].append(data.strip())


def read_page(path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def test_report_page_and_plot_show_every_scorer(tmp_path):
    a = _evaluated(tmp_path, "A", [1.0, 2.0, 3.0])
    b = _evaluated(tmp_path, "B", [2.0, 2.0, 1.0])
    files = compare([a, b], tmp_path / "report", num_resamples=20, grid_prompts=2)
    with Image.open(files["plot"]) as plot:
        plot.load()
        assert plot.format == "PNG" and plot.size[0] > 100
        assert plot.info["Description"] == "scorers: pickscore"
    page = read_page(files["page"])
    assert "PickScore" in page.tables["table2"]
    assert page.images[0] == "report.png"
    assert sum(src.startswith("data:image/png;base64,") for src in page.images) == 2 * 2  # 2 prompts x 2 models
    assert page.tables["samples"] == ["prompt", "A", "B"]


def test_report_html_renders_in_a_real_browser(tmp_path):
    """compare's report.html opened in headless Chromium (Debian's `chromium`): its tables are there
    and every image it shows has loaded (a width > 0)."""
    import shutil
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium on this machine (CI installs Debian's `chromium`; apt-get install chromium)")
    a = _evaluated(tmp_path, "A", [21.0, 22.0, 23.0, 24.0])
    b = _evaluated(tmp_path, "B", [20.0, 22.0, 25.0, 21.0])
    page = compare([a, b], tmp_path / "report", num_resamples=50)["page"]
    probe = page.with_name("probe.html")  # the page plus a script that records what loaded
    probe.write_text(page.read_text().replace("</body>", (
        "<script>window.addEventListener('load', () => {document.body.setAttribute('data-images', "
        "[...document.images].map(i => (i.complete && i.naturalWidth > 0) ? 1 : 0).join(''));"
        "document.body.setAttribute('data-tables', document.querySelectorAll('table').length);});</script></body>")))
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--allow-file-access-from-files",
         "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
    match = re.search(r'data-images="([01]*)"', dom)
    assert match and match.group(1) and set(match.group(1)) == {"1"}, dom[:500]
    assert int(re.search(r'data-tables="(\d+)"', dom).group(1)) >= 2
    assert "win rate" in dom.lower() and ">A<" in dom and ">B<" in dom
