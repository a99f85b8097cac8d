import json
from importlib import resources

import pytest

from smpo.prompts import HPDV2_STYLES, Prompt, load_prompts

GIGGLE = ('"G I G G L E" painted in thick colorful lettering as graffiti on a faded red brick wall '
          "with a splotch of exploding white paint.")


def _parti_rows():
    """The TSV split by hand (no csv module): one row a line, tab-separated, header skipped."""
    text = resources.files("smpo.prompt_sets.parti").joinpath("PartiPrompts.tsv").read_text(encoding="utf-8")
    return [line.split("\t") for line in text.splitlines()[1:]]


def test_parti_is_the_1632_prompts_exactly_with_the_quoted_one_intact():
    prompts = load_prompts("parti")
    rows = _parti_rows()
    assert len(prompts) == len(rows) == 1632
    assert [p.text for p in prompts] == [r[0] for r in rows]
    assert [(p.category, p.challenge) for p in prompts] == [(r[1], r[2]) for r in rows]
    assert [p.index for p in prompts] == list(range(1632))
    assert prompts[0] == Prompt("bond", 0, category="Abstract", challenge="Basic")
    giggle = [p for p in prompts if p.text.startswith('"')]
    assert [(p.index, p.text, p.category) for p in giggle] == [(1560, GIGGLE, "Illustrations")]
    assert len({p.text for p in prompts}) == 1632


def test_parti_ships_its_licence_and_source_note():
    folder = resources.files("smpo.prompt_sets.parti")
    assert "Apache License" in folder.joinpath("LICENSE").read_text(encoding="utf-8")
    assert "fab29e41bb512a169b56acab4cf2a41dcb675e285df2efcde6640c7dd3c440eb" in folder.joinpath("SOURCE.txt").read_text()


def test_category_filter_keeps_full_set_indices_and_limit_cuts_after_it():
    animals = load_prompts("parti", categories=["animals"])
    assert len(animals) == 314
    expected = [i for i, r in enumerate(_parti_rows()) if r[1] == "Animals"]
    assert [p.index for p in animals] == expected
    two = load_prompts("parti", categories=["Animals", "Indoor Scenes"], limit=2)
    assert [p.index for p in two] == expected[:2]
    assert [p.text for p in load_prompts("parti", limit=3)] == ["bond", "element", "molecule"]


def test_unknown_category_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown category \['dogs'\].*Animals.*World Knowledge"):
        load_prompts("parti", categories=["dogs"])


def _write_hpdv2(folder, per_style=2):
    folder.mkdir()
    for style in HPDV2_STYLES:
        (folder / f"{style}.json").write_text(json.dumps([f"{style} prompt {i}" for i in range(per_style)]))
    return folder


def test_hpdv2_local_benchmark_folder(tmp_path):
    folder = _write_hpdv2(tmp_path / "benchmark")
    prompts = load_prompts(folder)
    assert [(p.index, p.category, p.text) for p in prompts[:3]] == [
        (0, "anime", "anime prompt 0"), (1, "anime", "anime prompt 1"), (2, "concept-art", "concept-art prompt 0")]
    assert len(prompts) == 8
    photo = load_prompts(folder, categories=["photo"])
    assert [(p.index, p.text) for p in photo] == [(6, "photo prompt 0"), (7, "photo prompt 1")]


def test_hpdv2_folder_missing_a_style_is_an_error(tmp_path):
    folder = _write_hpdv2(tmp_path / "benchmark")
    (folder / "paintings.json").unlink()
    with pytest.raises(FileNotFoundError, match="paintings.json is missing"):
        load_prompts(folder)


def test_user_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a cat\n\n  a dog  \n", encoding="utf-8")
    assert [(p.index, p.text) for p in load_prompts(txt)] == [(0, "a cat"), (1, "a dog")]

    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "x", "category": "A"}\n{"caption": "y"}\n', encoding="utf-8")
    assert [(p.text, p.category) for p in load_prompts(jsonl)] == [("x", "A"), ("y", None)]

    csv_file = tmp_path / "p.csv"
    csv_file.write_text('id,Prompt,category\n1,"a cat, sitting",pets\n2,"say ""hi""",words\n', encoding="utf-8")
    assert [(p.text, p.category) for p in load_prompts(csv_file)] == [("a cat, sitting", "pets"), ('say "hi"', "words")]
    assert [p.index for p in load_prompts(csv_file, categories=["WORDS"])] == [1]

    tsv = tmp_path / "p.tsv"
    tsv.write_text('prompt\tcategory\n"quoted" start\tq\n', encoding="utf-8")
    assert [p.text for p in load_prompts(tsv)] == ['"quoted" start']

    listing = tmp_path / "p.json"
    listing.write_text(json.dumps(["one", {"text": "two"}]))
    assert [p.text for p in load_prompts(listing, limit=5)] == ["one", "two"]


def test_user_file_errors_name_the_place(tmp_path):
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"prompt": "x"}\n{"title": "y"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl, record 2: no string field prompt"):
        load_prompts(jsonl)
    csv_file = tmp_path / "bad.csv"
    csv_file.write_text("id,words\n1,x\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no prompt column"):
        load_prompts(csv_file)
    with pytest.raises(FileNotFoundError, match="not one of parti, hpdv2"):
        load_prompts(tmp_path / "nothing.txt")
    odd = tmp_path / "p.yaml"
    odd.write_text("x")
    with pytest.raises(ValueError, match="unknown prompt file type"):
        load_prompts(odd)


def test_hpdv2_by_name_downloads_the_benchmark_files_from_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    folder = _write_hpdv2(tmp_path / "cache", per_style=1)
    calls = []

    def fake_download(repo_id, filename, *, subfolder=None, repo_type=None, revision=None):
        calls.append((repo_id, filename, subfolder, repo_type))
        return str(folder / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    prompts = load_prompts("hpdv2")
    assert calls == [("zhwang/HPDv2", f"{s}.json", "benchmark", "dataset") for s in HPDV2_STYLES]
    assert [(p.index, p.category) for p in prompts] == list(enumerate(HPDV2_STYLES))


def test_a_source_without_prompts_is_an_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty.txt: the prompt source holds no prompts"):
        load_prompts(empty)
    with pytest.raises(ValueError, match="limit must be >= 1"):
        load_prompts("parti", limit=0)


def test_generate_with_an_empty_prompt_file_exits_2_and_leaves_no_output(tmp_path, capsys):
    from smpo.cli import main

    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    out = tmp_path / "images"
    assert main(["generate", "--model", str(tmp_path), "--prompts", str(empty), "--output", str(out)]) == 2
    assert "holds no prompts" in capsys.readouterr().err
    assert not out.exists()
