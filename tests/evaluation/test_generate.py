import json

import numpy as np
import pytest
import torch
from PIL import Image

from smpo.cli import main
from smpo.evaluation.generate import image_seed, plan_images
from smpo.evaluation.manifest import read_manifest
from smpo.evaluation.pipelines import detect_family, trained_output_kind
from smpo.prompts import Prompt

FAST = ["--steps", "2"]


def _pixels(folder) -> dict[str, np.ndarray]:
    return {r.file: np.asarray(Image.open(folder / r.file)) for r in read_manifest(folder)}


def _generate(model, prompts, out, *extra, code: int = 0) -> None:
    args = ["generate", "--model", str(model), "--prompts", str(prompts), "--out", str(out), *FAST, *extra]
    assert main(args) == code


def test_seeds_follow_the_paper_by_default():
    assert [image_seed(0, p, i) for p, i in [(0, 0), (5, 0), (5, 2)]] == [0, 0, 2]
    assert image_seed(3, 5, 2, per_prompt=True) == 3 + 5 * 10_000 + 2
    plan = plan_images([Prompt("x", 4), "y"], images_per_prompt=2, seed=7)
    assert [(r.file, r.prompt_index, r.image_index, r.seed) for r in plan] == [
        ("images/00004_00.png", 4, 0, 7), ("images/00004_01.png", 4, 1, 8),
        ("images/00001_00.png", 1, 0, 7), ("images/00001_01.png", 1, 1, 8)]


def test_family_detection(tiny_pipelines, tmp_path):
    assert detect_family(tiny_pipelines["sd15"]) == "sd15"
    assert detect_family(tiny_pipelines["sdxl"]) == "sdxl"
    with pytest.raises(ValueError, match="not a diffusers pipeline"):
        detect_family(tmp_path)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_same_seed_same_image_whatever_the_batch_size(family, tiny_pipelines, prompt_file, tmp_path):
    model = tiny_pipelines[family]
    _generate(model, prompt_file, tmp_path / "b1", "--batch-size", "1", "--images-per-prompt", "2")
    _generate(model, prompt_file, tmp_path / "b4", "--batch-size", "4", "--images-per-prompt", "2")
    one, four = _pixels(tmp_path / "b1"), _pixels(tmp_path / "b4")
    assert len(one) == 6 and one.keys() == four.keys()
    for name in one:
        assert one[name].shape == (16, 16, 3)
        assert np.array_equal(one[name], four[name]), name
    # the two images of a prompt have different seeds, hence differ
    assert not np.array_equal(one["images/00000_00.png"], one["images/00000_01.png"])
    settings = json.loads((tmp_path / "b1" / "generation.json").read_text())["image_settings"]
    assert settings["guidance_scale"] == {"sd15": 7.5, "sdxl": 5.0}[family]


def test_split_over_processes_gives_the_same_images(tiny_pipelines, prompt_file, tmp_path):
    from smpo.evaluation.generate import generate_images
    from smpo.evaluation.pipelines import load_pipeline
    from smpo.prompts import load_prompts

    pipe, _ = load_pipeline(tiny_pipelines["sd15"])
    prompts = load_prompts(prompt_file)
    kwargs = dict(guidance_scale=7.5, num_inference_steps=2, progress=False)
    generate_images(pipe, prompts, tmp_path / "single", settings={"model": "tiny sd15"}, **kwargs)
    assert [r.prompt_index for r in read_manifest(tmp_path / "single")] == [0, 1, 2]
    settings = json.loads((tmp_path / "single" / "generation.json").read_text())["image_settings"]
    assert (settings["model"], settings["guidance_scale"], settings["steps"]) == ("tiny sd15", 7.5, 2)
    with pytest.raises(ValueError, match="steps: 2 -> 3"):
        generate_images(pipe, prompts, tmp_path / "single", **{**kwargs, "num_inference_steps": 3})
    for rank in range(2):  # what two GPUs under accelerate do: prompts split by index modulo 2
        generate_images(pipe, prompts, tmp_path / "split", process_index=rank, num_processes=2, finish=False,
                        **kwargs)
    files = sorted(p.name for p in (tmp_path / "single" / "images").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "split" / "images").iterdir()) == [
        "00000_00.png", "00001_00.png", "00002_00.png"]
    for name in files:
        a = np.asarray(Image.open(tmp_path / "single" / "images" / name))
        assert np.array_equal(a, np.asarray(Image.open(tmp_path / "split" / "images" / name)))


def test_resume_skips_finished_images_and_refuses_other_settings(tiny_pipelines, prompt_file, tmp_path, capsys):
    out = tmp_path / "run"
    _generate(tiny_pipelines["sd15"], prompt_file, out, "--limit", "2")
    assert [r.prompt_index for r in read_manifest(out)] == [0, 1]
    kept, removed = out / "images/00000_00.png", out / "images/00001_00.png"
    before, stamp = removed.read_bytes(), kept.stat().st_mtime_ns
    removed.unlink()
    _generate(tiny_pipelines["sd15"], prompt_file, out)  # resumes, and extends to all 3 prompts
    assert removed.read_bytes() == before
    assert kept.stat().st_mtime_ns == stamp
    assert [(r.prompt_index, r.prompt) for r in read_manifest(out)] == [
        (0, "a red cube"), (1, "a blue ball on grass"), (2, '"quoted" sky at night')]
    _generate(tiny_pipelines["sd15"], prompt_file, out, "--cfg", "2", code=2)
    assert "other settings (guidance_scale: 7.5 -> 2.0); use another output folder or --overwrite" in capsys.readouterr().err
    edited = tmp_path / "edited.txt"
    edited.write_text("a red cube\na green ball\n")
    _generate(tiny_pipelines["sd15"], edited, tmp_path / "edited_run")
    edited.write_text("a red cube\na blue ball\n")  # the same file, edited between two runs
    _generate(tiny_pipelines["sd15"], edited, tmp_path / "edited_run", code=2)
    assert "prompt 1 was 'a green ball' in an earlier run, now 'a blue ball'" in capsys.readouterr().err
    _generate(tiny_pipelines["sd15"], prompt_file, out, "--cfg", "2", "--overwrite")
    assert removed.read_bytes() != before


def _save_trained_unet(tiny_pipelines, folder):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_pipelines["sd15"], subfolder="unet")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # "training": a small random step away from the base weights
        for p in unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    unet.save_pretrained(folder / "unet")
    return folder


def _save_lora(tiny_pipelines, folder):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(tiny_pipelines["sd15"], subfolder="unet")
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet))
    return folder


def test_trained_unet_and_lora_outputs(tiny_pipelines, prompt_file, tmp_path):
    model = tiny_pipelines["sd15"]
    trained = _save_trained_unet(tiny_pipelines, tmp_path / "trained")  # as `smpo train`'s final/unet
    lora = _save_lora(tiny_pipelines, tmp_path / "run" / "lora")  # as `smpo train`'s final/lora
    assert trained_output_kind(trained) == ("unet", str(trained), "unet")
    assert trained_output_kind(trained / "unet") == ("unet", str(trained / "unet"), None)
    assert trained_output_kind(lora) == ("lora", str(lora), None)
    assert trained_output_kind(lora.parent) == ("lora", str(lora), None)
    runs = {"base": [], "unet": ["--unet", str(trained)], "unet_dir": ["--unet", str(trained / "unet")],
            "lora": ["--unet", str(lora.parent)], "lora0": ["--unet", str(lora), "--lora-scale", "0"]}
    for name, extra in runs.items():
        _generate(model, prompt_file, tmp_path / name, "--limit", "1", *extra)
    image = {n: _pixels(tmp_path / n)["images/00000_00.png"] for n in runs}
    assert np.array_equal(image["unet"], image["unet_dir"])
    assert not np.array_equal(image["unet"], image["base"])
    assert not np.array_equal(image["lora"], image["base"])
    assert np.array_equal(image["lora0"], image["base"])  # a LoRA at weight 0 is the base model
    with pytest.raises(ValueError, match="neither a UNet"):
        trained_output_kind(tmp_path / "base" / "images")


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_controlnet_uses_the_conditioning_images(family, tiny_pipelines, prompt_file, tmp_path):
    from diffusers import ControlNetModel, UNet2DConditionModel

    model = tiny_pipelines[family]
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a fresh ControlNet's zero convolutions ignore the condition: wake them up
        for block in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                      controlnet.controlnet_cond_embedding.conv_out]:
            block.weight.copy_(0.5 * torch.randn(block.weight.shape, generator=generator))
    controlnet.save_pretrained(tmp_path / "controlnet")
    _generate(model, prompt_file, tmp_path / "source")
    edges = tmp_path / "edges"
    edges.mkdir()
    Image.new("RGB", (16, 16), (255, 255, 255)).save(edges / "0.png")
    Image.new("RGB", (16, 16), (0, 0, 0)).save(edges / "1.png")
    Image.new("RGB", (16, 16), (255, 255, 255)).save(edges / "2.png")
    cn = ["--controlnet", str(tmp_path / "controlnet"), "--limit", "3"]
    _generate(model, prompt_file, tmp_path / "canny", *cn, "--control-type", "canny", "--control-images",
              str(tmp_path / "source"))
    _generate(model, prompt_file, tmp_path / "white", *cn, "--control-type", "depth", "--control-images", str(edges))
    settings = json.loads((tmp_path / "canny" / "generation.json").read_text())["image_settings"]
    assert (settings["guidance_scale"], settings["conditioning_scale"]) == (5.0, 0.3)
    depth = json.loads((tmp_path / "white" / "generation.json").read_text())["image_settings"]
    assert depth["conditioning_scale"] == 0.5
    white, canny = _pixels(tmp_path / "white"), _pixels(tmp_path / "canny")
    assert len(canny) == 3
    _generate(model, prompt_file, tmp_path / "black", *cn, "--control-type", "depth", "--control-images",
              str(edges / "1.png"))
    black = _pixels(tmp_path / "black")
    # same prompt and seed, different conditioning image -> different picture
    assert not np.array_equal(white["images/00000_00.png"], black["images/00000_00.png"])
    assert np.array_equal(white["images/00001_00.png"], black["images/00001_00.png"])  # both black maps


def test_controlnet_needs_its_options(tiny_pipelines, prompt_file, tmp_path, capsys):
    _generate(tiny_pipelines["sd15"], prompt_file, tmp_path / "x", "--controlnet", str(tmp_path), code=2)
    assert "--controlnet needs --control-type, one of canny, depth" in capsys.readouterr().err
    _generate(tiny_pipelines["sd15"], prompt_file, tmp_path / "y", "--controlnet", str(tmp_path),
              "--control-type", "canny", code=2)
    assert "--controlnet needs --control-images" in capsys.readouterr().err


def test_two_torchrun_processes_take_half_the_prompts_each_and_match_one_process(tiny_pipelines, prompt_file,
                                                                                  tmp_path):
    import os
    import subprocess
    import sys

    from smpo.cli import main

    options = ["--model", str(tiny_pipelines["sd15"]), "--prompts", str(prompt_file), "--steps", "2",
               "--images-per-prompt", "2"]
    assert main(["generate", *options, "--output", str(tmp_path / "one")]) == 0
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    script = tmp_path / "generate_logged.py"  # each process logs the prompts it samples
    script.write_text("import sys, smpo.evaluation.generate as g; real = g.sample_batch\n"
                      "def logged(pipe, batch, **kw):\n"
                      "    print('sampled', *sorted({r.prompt_index for r in batch}), flush=True)\n"
                      "    return real(pipe, batch, **kw)\n"
                      "g.sample_batch = logged\n"
                      "from smpo.cli import main; sys.exit(main(sys.argv[1:]))\n")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             "29518", "--tee", "3", str(script), "generate", *options, "--output", str(tmp_path / "two")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sampled: dict[str, set[str]] = {}
    for line in result.stdout.splitlines():
        if "sampled" in line:
            rank, _, rest = line.partition("]:")
            sampled.setdefault(rank.strip("[ "), set()).update(rest.split()[1:])
    assert sorted(map(sorted, sampled.values())) == [["0", "2"], ["1"]], result.stdout  # prompt k on process k % 2
    one, two = tmp_path / "one", tmp_path / "two"
    assert (one / "manifest.jsonl").read_bytes() == (two / "manifest.jsonl").read_bytes()
    names = sorted(p.name for p in (one / "images").iterdir())
    assert names == sorted(p.name for p in (two / "images").iterdir()) and len(names) == 6
    for name in names:
        assert (one / "images" / name).read_bytes() == (two / "images" / name).read_bytes()


def test_killed_by_sigkill_mid_image_then_rerun_writes_the_bytes_of_an_uninterrupted_run(tiny_pipelines, prompt_file,
                                                                                          tmp_path, capsys):
    from kill_helpers import assert_no_partial_file, kill_point, leftovers, run_killed, visible_files

    options = ["generate", "--model", str(tiny_pipelines["sd15"]), "--prompts", str(prompt_file), *FAST,
               "--images-per-prompt", "2", "--batch-size", "2"]
    reference, out = tmp_path / "reference", tmp_path / "killed"
    assert main([*options, "--out", str(reference)]) == 0
    # the atomic writes: generation.json (the settings), 3 batches of 2 images, manifest.jsonl, generation.json
    at = kill_point(9, seed=21)
    run_killed([*options, "--out", str(out)], at=at)
    assert_no_partial_file(out, reference, skip=("generation.json",))  # a killed run's holds no num_images yet
    assert not (out / "manifest.jsonl").exists() or at == 8
    if at > 0:  # the killed run's settings hold its rerun
        assert main([*options, "--out", str(out), "--cfg", "3"]) == 2
        assert "other settings (guidance_scale: 7.5 -> 3.0)" in capsys.readouterr().err
    assert main([*options, "--out", str(out)]) == 0
    assert visible_files(out) == visible_files(reference), at
    assert leftovers(out) == [], at
