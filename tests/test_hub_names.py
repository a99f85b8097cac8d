"""No removed hub name in the README, docs, recipes or code; docs/hub-names.md lists the removed
names with their live replacements, and every recipe's base model."""

from pathlib import Path

ROOT = Path(__file__).parents[1]
# removed name -> where its content lives now (each must be named in docs/hub-names.md)
REMOVED = {
    "runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "THUDM/ImageReward": "zai-org/ImageReward",  # also covers THUDM/ImageRewardDB
    "THUDM/ImageRewardDB": "zai-org/ImageRewardDB",
    "wuyuchen/ImageRewardDB": "zai-org/ImageRewardDB",
    "yuvalkirstain/pickapic_v2": "liuhuohuo2/pick-a-pic-v2",  # also covers yuvalkirstain/pickapic_v2_no_images
    "yuvalkirstain/pickapic_v1": "pickapic-anonymous/pickapic_v1",
    "DIBT/image_preferences_results": "data-is-better-together/open-image-preferences-v1-results",
}


def _scanned() -> list[Path]:
    """The README, every doc, every file of configs/ and every source file of the package."""
    files = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"),
             *(p for p in (ROOT / "configs").rglob("*") if p.is_file()),
             *(p for p in (ROOT / "src" / "smpo").rglob("*") if p.is_file() and p.suffix in (".py", ".md", ".txt",
                                                                                            ".json", ".yaml"))]
    return [f for f in files if f.name != "hub-names.md"]


def test_no_removed_hub_name_remains():
    hits = [f"{f.relative_to(ROOT)}: {old} (now {new})" for f in _scanned()
            for old, new in REMOVED.items() if old in f.read_text(errors="replace")]
    assert not hits, hits


def test_hub_names_lists_each_removed_name_and_its_replacement():
    listed = (ROOT / "docs" / "hub-names.md").read_text()
    removed_section = listed.split("## Removed or renamed names", 1)[1]
    for old, new in REMOVED.items():
        assert f"`{old}`" in removed_section and new in removed_section, old


def test_every_recipe_base_model_is_listed():
    listed = (ROOT / "docs" / "hub-names.md").read_text()
    for recipe in [*(ROOT / "configs" / "sd15").glob("*.yaml"), *(ROOT / "configs" / "sdxl").glob("*.yaml")]:
        text = recipe.read_text()
        model = next(line.split(":", 1)[1].strip() for line in text.splitlines() if "pretrained:" in line)
        assert f"`{model}`" in listed, recipe
