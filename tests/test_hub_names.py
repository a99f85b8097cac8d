"""No removed hub name in the README, docs, recipes or code (docs/hub-names.md lists the current ones)."""

from pathlib import Path

ROOT = Path(__file__).parents[1]
REMOVED = {"runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
           "THUDM/ImageReward": "zai-org/ImageReward"}


def test_no_removed_hub_name_remains():
    files = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "configs").rglob("*.yaml"),
             *(ROOT / "src" / "smpo").rglob("*.py")]
    hits = [f"{f.relative_to(ROOT)}: {old} (now {new})" for f in files if f.name != "hub-names.md"
            for old, new in REMOVED.items() if old in f.read_text()]
    assert not hits, hits
    listed = (ROOT / "docs" / "hub-names.md").read_text()
    assert all(new in listed for new in REMOVED.values())
    for recipe in [*(ROOT / "configs" / "sd15").glob("*.yaml"), *(ROOT / "configs" / "sdxl").glob("*.yaml")]:
        text = recipe.read_text()
        model = next(line.split(":", 1)[1].strip() for line in text.splitlines() if "pretrained:" in line)
        assert f"`{model}`" in listed, recipe
