"""Benchmark suites (deepgen/eval/suites.py) and their evaluate.py wiring: each suite's prompt file in its
official format, generated with the untrained tiny SFT model (2 steps, 64 px), must give exactly the files
the official scorer reads; reruns skip what exists; malformed inputs are one-line errors naming the place."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from deepgen.eval.suites import (
    SuiteSettings,
    cvtg_text_scores,
    generate_suite,
    grid_2x2,
    job_images,
    plan_suite,
    score_cvtg,
    split_2x2,
    write_report,
)
from deepgen.inference import EDIT_NEGATIVE_PROMPT, load_model

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = SuiteSettings(num_steps=2, size=64, batch_size=4)
GENEVAL_LINES = [
    '{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}',
    '{"tag": "colors", "include": [{"class": "cow", "count": 1, "color": "red"}], "prompt": "a photo of a red cow"}',
]


@pytest.fixture(scope="module")
def backbone(tiny_sft_run):
    return load_model(tiny_sft_run[0], device="cpu").backbone


def files_under(folder: Path) -> list[str]:
    """Every file below ``folder`` (hidden ones included: no partial files may stay behind)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB")).astype(int)


def save_image(path: Path, size: tuple[int, int], color: tuple[int, int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def png_bytes(size: tuple[int, int], color: tuple[int, int, int]) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_cvtg(root: Path, items: dict[tuple[str, int], list[dict]]) -> Path:
    for (subset, area), data_list in items.items():
        (root / subset).mkdir(parents=True, exist_ok=True)
        (root / subset / f"{area}.json").write_text(json.dumps({"data_list": data_list}))
    return root


def test_geneval_layout_metadata_and_resume(backbone, tmp_path):
    prompts = tmp_path / "evaluation_metadata.jsonl"
    prompts.write_text(GENEVAL_LINES[0] + "\n\n" + GENEVAL_LINES[1] + "\n")
    out = tmp_path / "geneval"
    plan = plan_suite("geneval", prompts, out, SETTINGS)
    assert (plan.cfg_scale, plan.negative_prompt) == (4.0, "")
    written = generate_suite(backbone, plan, SETTINGS.batch_size, progress=False)
    samples = [f"{i:05d}/samples/{j:04d}.png" for i in range(2) for j in range(4)]
    assert files_under(out) == sorted([*samples, "00000/metadata.jsonl", "00001/metadata.jsonl"])
    assert [p.relative_to(out).as_posix() for p in written] == samples
    for i, line in enumerate(GENEVAL_LINES):
        # The scorer reads metadata.jsonl with json.load: one object, the prompt file's line i.
        assert (out / f"{i:05d}/metadata.jsonl").read_text() == line + "\n"
        with open(out / f"{i:05d}/metadata.jsonl") as fp:
            assert json.load(fp) == json.loads(line)
    with Image.open(out / "00001/samples/0003.png") as img:
        assert img.size == (64, 64)
        assert img.text["prompt"] == "a photo of a red cow"
        assert json.loads(img.text["seeds"]) == [42 + 4 + 3]
    first = [pixels(out / name) for name in samples[:4]]
    assert all(np.abs(first[0] - other).max() > 0 for other in first[1:])  # four seeds, four images

    # A rerun generates nothing and needs no model; a lost image comes back the same.
    assert generate_suite(None, plan, SETTINGS.batch_size, progress=False) == []
    lost = out / "00001/samples/0002.png"
    before = pixels(lost)
    lost.unlink()
    assert generate_suite(backbone, plan, SETTINGS.batch_size, progress=False) == [lost]
    assert np.abs(pixels(lost) - before).max() <= 2  # per-image seeds: the batch does not matter

    # Resuming with other settings would mix two runs in one folder: an error, not a skip.
    other = plan_suite("geneval", prompts, out, SuiteSettings(num_steps=3, size=64))
    with pytest.raises(ValueError, match="00000/samples/0000.png was made with num_steps='2', not '3'"):
        other.pending()


def test_dpg_grids_alone_in_their_folder(backbone, tmp_path):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "b_2.txt").write_text("A cabbage field at dawn.\n")
    (prompts / "a_1.txt").write_text("Two red apples on a table.")
    (prompts / "notes.md").write_text("not a prompt")
    out = tmp_path / "dpg"
    plan = plan_suite("dpg", prompts, out, SETTINGS)
    assert plan.cfg_scale == 7.5 and [job.seeds for job in plan.jobs] == [(42, 43, 44, 45), (46, 47, 48, 49)]
    generate_suite(backbone, plan, SETTINGS.batch_size, progress=False)
    write_report(plan, {"images": 2})
    # The scorer scores every file of the folder, named after the prompt file: nothing else may be there.
    assert files_under(out) == ["a_1.png", "b_2.png"]
    assert plan.report_path == tmp_path / "dpg_eval_report.json" and plan.report_path.is_file()
    grid = pixels(out / "a_1.png")
    assert grid.shape == (128, 128, 3)
    cells = split_2x2(grid)
    assert all(np.abs(cells[0] - cell).max() > 0 for cell in cells[1:])
    assert np.array_equal(grid_2x2(np.stack(cells)), grid)
    samples = list(job_images(plan))
    assert (
        len(samples) == 8
        and samples[4][1] == "A cabbage field at dawn."
        and samples[4][0].shape == (64, 64, 3)
    )


def test_cvtg_layout_and_scores(backbone, tmp_path):
    root = write_cvtg(
        tmp_path / "CVTG-2K",
        {
            ("CVTG", 2): [
                {
                    "index": 7,
                    "prompt": 'A shop sign "OPEN" and a poster "SALE"',
                    "sentence_list": ["OPEN", "SALE"],
                },
                {"index": 3, "prompt": "A door", "carrier_list": ["door"], "sentence_list": ["PUSH"]},
            ],
            ("CVTG-Style", 3): [{"index": 0, "prompt": 'A red banner reading "Happy New Year"'}],
        },
    )
    out = tmp_path / "cvtg"
    plan = plan_suite("cvtg", root, out, SETTINGS)
    assert [job.targets for job in plan.jobs] == [("OPEN", "SALE"), ("PUSH",), ("Happy New Year",)]
    generate_suite(backbone, plan, SETTINGS.batch_size, progress=False)
    assert files_under(out) == ["CVTG-Style/3/0.png", "CVTG/2/3.png", "CVTG/2/7.png"]

    class FakeOcr:
        def read_text(self, image: np.ndarray) -> str:
            return "OPEN sale, happy new"

    scores = score_cvtg(plan, ocr=FakeOcr())
    assert scores["samples"]["CVTG/2/7.png"]["word_accuracy"] == 1.0
    assert scores["samples"]["CVTG/2/3.png"]["word_accuracy"] == 0.0
    assert scores["samples"]["CVTG-Style/3/0.png"]["word_accuracy"] == pytest.approx(2 / 3)
    assert scores["overall"]["n"] == 3 and scores["subsets"]["CVTG"]["n"] == 2
    assert set(scores["areas"]) == {"2", "3"}
    assert scores["overall"]["word_accuracy"] == pytest.approx((1 + 0 + 2 / 3) / 3)


def render_text(text: str, path: Path) -> None:
    image = Image.new("RGB", (320, 96), "white")
    ImageDraw.Draw(image).text((16, 20), text, fill="black", font=ImageFont.load_default(size=48))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def test_cvtg_ocr_reads_rendered_text(tmp_path):
    """The real OCR: a correctly rendered word scores 1.0, a wrong one lower; a rerun reuses the OCR text."""
    root = write_cvtg(
        tmp_path / "CVTG-2K",
        {
            ("CVTG", 2): [
                {"index": i, "prompt": "a sign", "sentence_list": [w]}
                for i, w in enumerate(["HELLO", "WORLD"])
            ]
        },
    )
    plan = plan_suite("cvtg", root, tmp_path / "out", SETTINGS)
    for job in plan.jobs:
        render_text("HELLO", job.path)
    scores = score_cvtg(plan)
    right, wrong = scores["samples"]["CVTG/2/0.png"], scores["samples"]["CVTG/2/1.png"]
    assert right["ocr_text"].strip().upper() == "HELLO"
    assert (right["word_accuracy"], right["ned"]) == (1.0, 1.0)
    assert wrong["word_accuracy"] == 0.0 and wrong["ned"] < 1.0
    write_report(plan, {"cvtg": scores})

    class NoOcr:
        def read_text(self, image: np.ndarray) -> str:
            raise AssertionError("the OCR text of unchanged images comes from the report")

    assert score_cvtg(plan, ocr=NoOcr()) == scores
    render_text("WORLD", plan.jobs[1].path)  # a changed image is read again
    assert score_cvtg(plan)["samples"]["CVTG/2/1.png"]["word_accuracy"] == 1.0


def test_cvtg_text_scores():
    assert cvtg_text_scores("Grand OPENING, today!", ["grand opening"]) == {
        "word_accuracy": 1.0,
        "ned": 1 - 6 / 19,
    }
    assert cvtg_text_scores("", ["SUN"]) == {"word_accuracy": 0.0, "ned": 0.0}
    # Each OCR word matches one target word only.
    assert cvtg_text_scores("the", ["the the"])["word_accuracy"] == 0.5


def test_imgedit_layout(backbone, tmp_path):
    bench = tmp_path / "singleturn"
    save_image(bench / "animal" / "000342021.jpg", (96, 48), (200, 30, 30))
    save_image(bench / "style" / "000278574.jpg", (40, 80), (30, 30, 200))
    edits = {
        "1082": {"id": "animal/000342021.jpg", "prompt": "Make the shell smooth.", "edit_type": "adjust"},
        "673": {"id": "style/000278574.jpg", "prompt": "Ukiyo-e style.", "edit_type": "style"},
    }
    (bench / "singleturn.json").write_text(json.dumps(edits))
    out = tmp_path / "imgedit"
    plan = plan_suite("imgedit", bench / "singleturn.json", out, SETTINGS)
    assert plan.negative_prompt == EDIT_NEGATIVE_PROMPT and plan.jobs[1].source == bench / edits["673"]["id"]
    generate_suite(backbone, plan, SETTINGS.batch_size, progress=False)
    assert files_under(out) == ["1082.png", "673.png"]
    with Image.open(out / "673.png") as img:
        assert img.size == (64, 64) and img.text["negative_prompt"] == EDIT_NEGATIVE_PROMPT

    elsewhere = plan_suite("imgedit", bench / "singleturn.json", out, SETTINGS, source_root=bench)
    assert elsewhere.jobs[0].source == bench / "animal" / "000342021.jpg"


def test_gedit_layout_from_the_hub_parquet(backbone, tmp_path):
    def image(size, color):
        return {"bytes": png_bytes(size, color), "path": None}

    table = pa.table(
        {
            "task_type": ["background_change", "text_change"],
            "key": ["a1b2", "c3d4"],
            "instruction": ["Make the sky purple.", "把文字改成红色"],
            "instruction_language": ["en", "cn"],
            "input_image": [image((80, 48), (10, 200, 10)), image((48, 48), (250, 250, 0))],
            "input_image_raw": [image((160, 96), (10, 200, 10)), image((96, 96), (250, 250, 0))],
            "Intersection_exist": [True, False],
        }
    )
    data = tmp_path / "GEdit-Bench" / "data"
    data.mkdir(parents=True)
    pq.write_table(table, data / "train-00000-of-00001.parquet")
    out = tmp_path / "results" / "deepgen"
    plan = plan_suite("gedit", tmp_path / "GEdit-Bench", out, SETTINGS)
    generate_suite(backbone, plan, SETTINGS.batch_size, progress=False)
    assert files_under(out) == [
        "fullset/background_change/en/a1b2.png",
        "fullset/background_change/en/a1b2_SRCIMG.png",
        "fullset/text_change/cn/c3d4.png",
        "fullset/text_change/cn/c3d4_SRCIMG.png",
    ]
    # The scorer reads the source from beside the output: the dataset's input_image, at its own size.
    source = pixels(out / "fullset/background_change/en/a1b2_SRCIMG.png")
    assert source.shape == (48, 80, 3) and (source == [10, 200, 10]).all()
    assert pixels(out / "fullset/text_change/cn/c3d4.png").shape == (64, 64, 3)

    # datasets' save_to_disk writes arrow streams: the same rows, the same files.
    saved = tmp_path / "saved"
    saved.mkdir()
    with (
        pa.OSFile(str(saved / "data-00000-of-00001.arrow"), "wb") as sink,
        pa.ipc.new_stream(sink, table.schema) as w,
    ):
        w.write_table(table)
    assert [job.path for job in plan_suite("gedit", saved, out, SETTINGS).jobs] == [
        job.path for job in plan.jobs
    ]

    # The same rows as a JSONL with image paths plan the same files.
    save_image(tmp_path / "jsonl" / "src.png", (32, 32), (0, 0, 0))
    row = {"key": "a1b2", "task_type": "background_change", "instruction": "x", "instruction_language": "en"}
    (tmp_path / "jsonl" / "gedit.jsonl").write_text(json.dumps({**row, "input_image": "src.png"}) + "\n")
    plan = plan_suite("gedit", tmp_path / "jsonl" / "gedit.jsonl", out, SETTINGS)
    assert plan.jobs[0].path == out / "fullset/background_change/en/a1b2.png"
    assert plan.jobs[0].source == tmp_path / "jsonl" / "src.png"


def malformed_input(suite: str, case: str, tmp: Path) -> tuple[Path, str]:
    """A broken prompt file for ``suite`` and the error it must give."""
    if suite == "geneval":
        path = tmp / "meta.jsonl"
        if case == "json":
            path.write_text(GENEVAL_LINES[0] + "\n{not json\n")
            return path, f"{path}:2: not valid JSON"
        path.write_text('{"tag": "colors"}\n')
        return path, f"{path}:1: no 'prompt' string"
    if suite == "dpg":
        (tmp / "prompts").mkdir()
        (tmp / "prompts" / "7.txt").write_text("  \n")
        return tmp / "prompts", f"{tmp / 'prompts' / '7.txt'} is empty"
    if suite == "cvtg":
        path = write_cvtg(tmp, {("CVTG", 4): [{"index": 0, "prompt": 'a "A"'}, {"prompt": 'b "B"'}]})
        return path, r"4.json: data_list\[1\] has no 'index'"
    if suite == "imgedit":
        path = tmp / "singleturn.json"
        path.write_text(json.dumps({"5": {"id": "x.jpg", "edit_type": "add"}}))
        return path, f"{path}: key '5' has no 'prompt' string"
    path = tmp / "gedit.jsonl"
    if case == "json":
        path.write_text(
            json.dumps({"key": "../up", "task_type": "t", "instruction": "i", "instruction_language": "en"})
        )
        return path, "'../up' cannot be a file name"
    pq.write_table(pa.table({"key": ["k"], "instruction": ["i"]}), tmp / "bad.parquet")
    return tmp / "bad.parquet", "bad.parquet lacks column 'task_type'"


@pytest.mark.parametrize(
    "suite,case",
    [
        ("geneval", "json"),
        ("geneval", "key"),
        ("dpg", ""),
        ("cvtg", ""),
        ("imgedit", ""),
        ("gedit", "json"),
        ("gedit", ""),
    ],
)
def test_malformed_inputs_name_the_file_and_place(suite, case, tmp_path):
    path, expected = malformed_input(suite, case, tmp_path)
    with pytest.raises(ValueError, match=expected) as error:
        plan_suite(suite, path, tmp_path / "out", SETTINGS)
    assert "\n" not in str(error.value)


def test_missing_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="geneval prompts .*nowhere.jsonl do not exist"):
        plan_suite("geneval", tmp_path / "nowhere.jsonl", tmp_path / "out", SETTINGS)
    (tmp_path / "edits.json").write_text(json.dumps({"1": {"id": "gone.jpg", "prompt": "p"}}))
    with pytest.raises(FileNotFoundError, match="key '1': source image .*gone.jpg does not exist"):
        plan_suite("imgedit", tmp_path / "edits.json", tmp_path / "out", SETTINGS)
    with pytest.raises(ValueError, match="holds no CVTG"):
        plan_suite("cvtg", tmp_path, tmp_path / "out", SETTINGS)
    with pytest.raises(ValueError, match="multiple of 32"):
        plan_suite("cvtg", tmp_path, tmp_path / "out", SuiteSettings(size=100))


def evaluate(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "evaluate.py", "--steps", "2", "--size", "64", "--device", "cpu", "--no-progress"]
    return subprocess.run([*cmd, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_cli_suite_resume_and_fid(tiny_sft_run, tmp_path):
    prompts = tmp_path / "evaluation_metadata.jsonl"
    prompts.write_text("\n".join(GENEVAL_LINES) + "\n")
    out = tmp_path / "geneval"
    args = [
        "--checkpoint",
        str(tiny_sft_run[0]),
        "--suite",
        "geneval",
        "--prompts",
        str(prompts),
        "--out",
        str(out),
    ]
    result = evaluate(*args, "--limit", "1")
    assert result.returncode == 0, result.stderr
    assert len(list(out.glob("*/samples/*.png"))) == 4
    report = json.loads((out / "eval_report.json").read_text())
    assert report["settings"]["cfg_scale"] == 4.0 and report["generated"] == 4

    # Resumed with FID: the first prompt's images are kept, the second's generated; FID reads all eight.
    torch.jit.save(
        torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 2, 16, 16), torch.nn.Flatten())),
        str(tmp_path / "f.pt"),
    )
    for i in range(3):
        save_image(tmp_path / "reference" / f"{i}.png", (40, 40), (80 * i, 0, 0))
    fid = ["--fid-reference", str(tmp_path / "reference"), "--fid-weights", str(tmp_path / "f.pt")]
    result = evaluate(*args, *fid)
    assert result.returncode == 0, result.stderr
    assert "geneval: 8 images, 4 already in" in result.stdout
    report = json.loads((out / "eval_report.json").read_text())
    assert report["generated"] == 4 and report["fid"] > 0

    # Missing metric weights stop the run before any image is generated, with one line.
    fresh = [a if a != str(out) else str(tmp_path / "fresh") for a in args]
    result = evaluate(*fresh, "--clip-weights", str(tmp_path / "no_clip"))
    assert result.returncode != 0 and not (tmp_path / "fresh").exists()
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "no_clip has no config.json" in result.stderr
