"""Dataset converters: every layout round-trips, shards are deterministic and resumable, bad input is
skipped and counted, user errors are one line, and train.py trains on converted shards."""

import io
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from PIL import Image

from deepgen.config import DataConfig
from deepgen.data.convert import ConvertError, ConvertOptions, convert, state_path
from deepgen.data.shards import ReadOptions, edit_batches, shard_urls, t2i_batches
from deepgen.data.tiny_world import caption_scene, random_scene, render_scene

ROOT = Path(__file__).resolve().parents[3]
READ = dict(
    batch_size=1,
    opts=ReadOptions.from_config(
        DataConfig(name="t", shards_dir="-", image_size=32, shuffle_buffer=0, resampled=False)
    ),
)


def image_bytes(seed: int, size: tuple[int, int] = (32, 32), fmt: str = "PNG") -> bytes:
    """A small image whose pixels differ per seed."""
    img = Image.new("RGB", size, (seed * 37 % 256, seed * 91 % 256, 255 - seed * 13 % 256))
    img.putpixel((0, 0), (seed % 256, 0, 0))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def write(path: Path, data: bytes | str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path.name


def read_shards(out: Path, task: str) -> dict[str, dict]:
    """key -> sample (member -> bytes, json parsed), read with webdataset in shard order."""
    urls = [str(p) for p in sorted(out.glob(f"{task}-*.tar"))]
    samples = {}
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        members = {k: v for k, v in s.items() if not k.startswith("__")}
        samples[s["__key__"]] = {**members, "json": json.loads(members["json"])}
    return samples


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def run(tmp_path: Path, layout: str, input: Path, **options) -> dict:
    workers = options.pop("workers", 1)
    opts = ConvertOptions(layout=layout, input=str(input), out=str(tmp_path / "out"), **options)
    return convert(opts, workers=workers, progress=False)


def folder_dataset(root: Path, n: int, size: int = 32) -> list[tuple[bytes, str]]:
    """n tiny-world images with .txt captions, named so that their sorted order is their index."""
    items = []
    for i in range(n):
        rng = random.Random(i)
        spec = random_scene(rng, size, size)
        buf = io.BytesIO()
        render_scene(spec).save(buf, format="PNG")
        caption = caption_scene(spec, rng)
        write(root / f"{i:04d}.png", buf.getvalue())
        write(root / f"{i:04d}.txt", caption + "\n")
        items.append((buf.getvalue(), caption))
    return items


# ----------------------------------------------------------------------------------------------------------
# Layouts


def test_t2i_sft_json_keeps_original_bytes_and_concatenates_json_files(tmp_path):
    images = tmp_path / "images"
    write(images / "a.png", image_bytes(1))
    write(images / "b.jpg", image_bytes(2, fmt="JPEG"))
    write(images / "c.bmp", image_bytes(3, fmt="BMP"))
    first = {
        "type": "T2I_SFT",
        "txt": "first",
        "image": "",
        "image_path": "a.png",
        "category": "text_rendering",
    }
    second = {"type": "T2I_SFT", "txt": "second", "image": "", "image_path": "b.jpg", "category": "bogus"}
    third = {"type": "T2I_SFT", "txt": "third", "image": "", "image_path": "c.bmp"}
    write(tmp_path / "json" / "0.json", json.dumps([first]))
    write(tmp_path / "json" / "1.json", json.dumps([second, third]))

    report = run(tmp_path, "t2i_sft_json", tmp_path / "json", image_root=str(images))

    samples = read_shards(tmp_path / "out", "t2i")
    assert list(samples) == ["t2i-000000000", "t2i-000000001", "t2i-000000002"]
    a, b, c = samples.values()
    assert a["json"] == {"task": "t2i", "caption": "first", "category": "text_rendering", "schema_version": 1}
    assert b["json"] == {"task": "t2i", "caption": "second", "schema_version": 1}  # invalid category dropped
    assert a["png"] == image_bytes(1) and b["jpg"] == image_bytes(2, fmt="JPEG")  # not re-encoded
    with Image.open(io.BytesIO(c["png"])) as converted, Image.open(images / "c.bmp") as original:
        assert converted.format == "PNG" and converted.tobytes() == original.convert("RGB").tobytes()
    assert report["samples"] == 3 and report["skipped"] == {}


def test_caption_json_reads_cap_source_and_applies_the_original_size_filter(tmp_path):
    sizes = {"ok": (96, 96), "wide": (240, 90), "small": (96, 80), "thin": (1000, 90)}
    entries = []
    for i, (name, size) in enumerate(sizes.items()):
        write(tmp_path / "raw" / "0000" / f"{name}.jpg", image_bytes(i, size, "JPEG"))
        annotation = {"caption": "short", "caption_internlm2_short": f"caption of {name}"}
        write(tmp_path / "caps" / "0000" / f"{name}.json", json.dumps(annotation))
        entries.append({"image": f"0000/{name}.jpg", "annotation": f"0000/{name}.json"})
    write(tmp_path / "data.json", json.dumps(entries))
    common = dict(image_root=str(tmp_path / "raw"), caption_root=str(tmp_path / "caps"))

    report = run(
        tmp_path, "caption_json", tmp_path / "data.json", cap_source="caption_internlm2_short", **common
    )

    samples = read_shards(tmp_path / "out", "t2i")
    assert [s["json"]["caption"] for s in samples.values()] == ["caption of ok", "caption of wide"]
    assert samples["t2i-000000001"]["jpg"] == image_bytes(1, (240, 90), "JPEG")
    assert report["skipped"] == {"bad_aspect": 1, "too_small": 1}
    assert manifest(tmp_path / "out")["conversions"]["t2i"]["options"]["min_side"] == 80

    report = run(
        tmp_path / "nofilter", "caption_json", tmp_path / "data.json", min_side=0, max_aspect=0, **common
    )
    assert report["samples"] == 4


def test_edit_json_keeps_every_source_in_order(tmp_path):
    entries = []
    for i, num_sources in enumerate([1, 3, 2]):
        sources = [write(tmp_path / f"e{i}_in{k}.png", image_bytes(10 * i + k)) for k in range(num_sources)]
        target = write(tmp_path / f"e{i}_out.png", image_bytes(10 * i + 9))
        entries.append({"input_image": sources, "output_image": target, "instruction": f"edit {i}"})
    entries[0]["input_image"] = entries[0]["input_image"][0]  # a plain string is one source
    write(tmp_path / "edit.json", json.dumps(entries))

    run(tmp_path, "edit_json", tmp_path / "edit.json")

    samples = read_shards(tmp_path / "out", "edit")
    for i, (sample, num_sources) in enumerate(zip(samples.values(), [1, 3, 2], strict=True)):
        assert sample["json"] == {"task": "edit", "instruction": f"edit {i}", "schema_version": 1}
        sources = [f"src{k or ''}.png" for k in range(num_sources)]
        assert sorted(sample) == sorted([*sources, "tgt.png", "json"])
        assert [sample[s] for s in sources] == [image_bytes(10 * i + k) for k in range(num_sources)]
        assert sample["tgt.png"] == image_bytes(10 * i + 9)
    batches = list(edit_batches(shard_urls(tmp_path / "out", "edit-*.tar"), **READ))
    assert [len(b["sources"][0]) for b in batches] == [1, 3, 2]
    assert [b["instructions"][0] for b in batches] == ["edit 0", "edit 1", "edit 2"]


def test_folder_finds_images_recursively_with_txt_caption_and_json_side_files(tmp_path):
    data = tmp_path / "data"
    write(data / "b" / "x.png", image_bytes(1))
    write(data / "b" / "x.txt", "  from txt\n")
    write(data / "a.png", image_bytes(2))
    write(data / "a.caption", "from caption")
    write(data / "c" / "d" / "y.jpg", image_bytes(3, fmt="JPEG"))
    write(data / "c" / "d" / "y.json", json.dumps({"caption": "-", "prompt": "from json"}))
    write(data / ".hidden" / "z.png", image_bytes(4))
    write(data / ".hidden" / "z.txt", "hidden folders are ignored")

    report = run(tmp_path, "folder", data, cap_source="prompt")

    samples = read_shards(tmp_path / "out", "t2i")  # sorted by path: a.png, b/x.png, c/d/y.jpg
    assert [s["json"]["caption"] for s in samples.values()] == ["from caption", "from txt", "from json"]
    assert [s.get("png") or s.get("jpg") for s in samples.values()] == [
        image_bytes(2),
        image_bytes(1),
        image_bytes(3, fmt="JPEG"),
    ]
    assert report["rows"] == 3


def test_folder_shards_read_back_with_the_training_reader(tmp_path):
    items = folder_dataset(tmp_path / "data", 6)
    run(tmp_path, "folder", tmp_path / "data", samples_per_shard=4)
    batches = list(t2i_batches(shard_urls(tmp_path / "out", "t2i-*.tar"), **READ))
    assert [b["captions"][0] for b in batches] == [caption for _, caption in items]
    for batch, (png, _) in zip(batches, items, strict=True):
        with Image.open(io.BytesIO(png)) as img:
            expected = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1) / 127.5 - 1
        assert torch.allclose(batch["images"][0], expected)


def test_jsonl_with_custom_columns_for_t2i_and_edit(tmp_path):
    write(tmp_path / "img" / "0.png", image_bytes(0))
    write(tmp_path / "img" / "1.png", image_bytes(1))
    write(tmp_path / "img" / "2.png", image_bytes(2))
    rows = [{"file": "0.png", "text": "zero", "category": "reasoning"}, {"file": "1.png", "text": "one"}]
    write(tmp_path / "t2i.jsonl", "\n".join(map(json.dumps, rows)) + "\n\n")
    edits = [
        {"srcs": ["0.png", "1.png"], "dst": "2.png", "how": "merge"},
        {"srcs": "1.png", "dst": "2.png", "how": "x"},
    ]
    write(tmp_path / "edit.jsonl", "\n".join(map(json.dumps, edits)))
    image_root = str(tmp_path / "img")

    run(
        tmp_path,
        "jsonl",
        tmp_path / "t2i.jsonl",
        image_root=image_root,
        image_column="file",
        caption_column="text",
    )
    run(
        tmp_path,
        "jsonl",
        tmp_path / "edit.jsonl",
        task="edit",
        image_root=image_root,
        source_column="srcs",
        target_column="dst",
        instruction_column="how",
    )

    t2i, edit = read_shards(tmp_path / "out", "t2i"), read_shards(tmp_path / "out", "edit")
    assert [s["json"] for s in t2i.values()] == [
        {"task": "t2i", "caption": "zero", "category": "reasoning", "schema_version": 1},
        {"task": "t2i", "caption": "one", "schema_version": 1},
    ]
    assert t2i["t2i-000000001"]["png"] == image_bytes(1)
    first, second = edit.values()
    assert [first[m] for m in ("src.png", "src1.png", "tgt.png")] == [image_bytes(i) for i in range(3)]
    assert sorted(second) == ["json", "src.png", "tgt.png"] and second["json"]["instruction"] == "x"
    both = manifest(tmp_path / "out")  # the two conversions share the folder
    assert sorted(both["conversions"]) == ["edit", "t2i"] and both["counts"] == {"t2i": 2, "edit": 2}


def test_parquet_with_binary_images_row_groups_and_edit_paths(tmp_path):
    images = [image_bytes(i) for i in range(10)]
    table = pa.table({"image": images, "caption": [f"caption {i}" for i in range(10)]})
    (tmp_path / "t2i").mkdir()
    pq.write_table(table.slice(0, 7), tmp_path / "t2i" / "a.parquet", row_group_size=3)
    pq.write_table(table.slice(7), tmp_path / "t2i" / "b.parquet", row_group_size=2)
    # Hugging Face datasets stores images as {"bytes", "path"} structs; path-only values are files.
    write(tmp_path / "t.png", image_bytes(20))
    hf = pa.table(
        {
            "img": [{"bytes": images[0], "path": "ignored.png"}, {"bytes": None, "path": "t.png"}],
            "caption": ["h0", "h1"],
        }
    )
    pq.write_table(hf, tmp_path / "hf.parquet")
    edit = pa.table(
        {
            "source_images": [["t.png", "t.png"], ["t.png"]],
            "target_image": ["t.png"] * 2,
            "instruction": ["a", "b"],
        }
    )
    pq.write_table(edit, tmp_path / "edit.parquet")

    report = run(tmp_path, "parquet", tmp_path / "t2i", samples_per_shard=4)  # shards cut across row groups
    samples = read_shards(tmp_path / "out", "t2i")
    assert [s["json"]["caption"] for s in samples.values()] == [f"caption {i}" for i in range(10)]
    assert [s["png"] for s in samples.values()] == images
    assert report["shards"] == 3
    run(tmp_path / "hf", "parquet", tmp_path / "hf.parquet", image_column="img", image_root=str(tmp_path))
    assert [s["png"] for s in read_shards(tmp_path / "hf" / "out", "t2i").values()] == [
        images[0],
        image_bytes(20),
    ]
    run(tmp_path / "edit", "parquet", tmp_path / "edit.parquet", task="edit")
    edits = read_shards(tmp_path / "edit" / "out", "edit")
    assert [sorted(s) for s in edits.values()] == [
        ["json", "src.png", "src1.png", "tgt.png"],
        ["json", "src.png", "tgt.png"],
    ]


# ----------------------------------------------------------------------------------------------------------
# Shards, determinism, resume


@pytest.fixture(scope="module")
def ten_images(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("ten") / "data"
    folder_dataset(data, 10)
    return data


def test_shard_size_keys_and_manifest_counts(tmp_path, ten_images):
    report = run(tmp_path, "folder", ten_images, samples_per_shard=4, prefix="mine")
    out = tmp_path / "out"
    m = manifest(out)
    assert m["shards"]["t2i"] == {"t2i-000000.tar": 4, "t2i-000001.tar": 4, "t2i-000002.tar": 2}
    assert m["counts"] == {"t2i": 10, "edit": 0} and m["conversions"]["t2i"]["samples"] == 10
    assert list(read_shards(out, "t2i")) == [f"mine-{i:09d}" for i in range(10)]
    assert report["written"] == 3


def test_two_workers_write_the_same_bytes_as_one(tmp_path, ten_images):
    run(tmp_path / "one", "folder", ten_images, samples_per_shard=3, workers=1)
    run(tmp_path / "two", "folder", ten_images, samples_per_shard=3, workers=2)
    one, two = (
        sorted((tmp_path / "one" / "out").glob("*.tar")),
        sorted((tmp_path / "two" / "out").glob("*.tar")),
    )
    assert [p.name for p in one] == [p.name for p in two] and len(one) == 4
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(one, two, strict=True))


def test_resume_writes_only_the_missing_shard(tmp_path):
    data = tmp_path / "data"
    folder_dataset(data, 10)
    write(data / "0003.png", b"not an image")  # a skip, to check that skip counts survive the resume
    first = run(tmp_path, "folder", data, samples_per_shard=4)
    out = tmp_path / "out"
    shards = sorted(out.glob("t2i-*.tar"))
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in shards}
    manifest_before = manifest(out)
    shards[1].unlink()

    again = run(tmp_path, "folder", data, samples_per_shard=4, workers=2)

    assert again["written"] == 1 and first["written"] == 3
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.glob("t2i-*.tar"))}
    assert after[shards[0].name] == before[shards[0].name] and after[shards[2].name] == before[shards[2].name]
    assert after[shards[1].name][1] == before[shards[1].name][1]  # rewritten, same bytes
    assert manifest(out) == manifest_before and manifest(out)["conversions"]["t2i"]["skipped"] == {
        "bad_image": 1
    }
    assert run(tmp_path, "folder", data, samples_per_shard=4)["written"] == 0


def test_resume_with_other_options_or_foreign_shards_is_refused(tmp_path, ten_images):
    run(tmp_path, "folder", ten_images, samples_per_shard=4)
    with pytest.raises(ConvertError, match=r"other settings \(samples_per_shard: 4 -> 5\)"):
        run(tmp_path, "folder", ten_images, samples_per_shard=5)
    state_path(tmp_path / "out", "t2i").unlink()
    with pytest.raises(ConvertError, match="already holds t2i shards that convert did not write"):
        run(tmp_path, "folder", ten_images, samples_per_shard=4)


# ----------------------------------------------------------------------------------------------------------
# Bad input and user errors


def test_bad_samples_are_skipped_counted_and_named(tmp_path):
    data = tmp_path / "data"
    write(data / "0_good.png", image_bytes(0))
    write(data / "0_good.txt", "good")
    write(data / "1_nocaption.png", image_bytes(1))
    write(data / "2_latin1.png", image_bytes(2))
    write(data / "2_latin1.txt", "caf\xe9".encode("latin-1"))
    write(data / "3_empty.png", b"")
    write(data / "3_empty.txt", "empty image file")
    write(data / "4_truncated.png", image_bytes(4, (64, 64))[:-40])
    write(data / "4_truncated.txt", "truncated")
    write(data / "5_garbage.jpg", b"\xff\xd8 not really a jpeg")
    write(data / "5_garbage.txt", "garbage")
    write(data / "6_blank.png", image_bytes(6))
    write(data / "6_blank.txt", " \n")

    report = run(tmp_path, "folder", data)

    assert list(read_shards(tmp_path / "out", "t2i")) == ["t2i-000000000"]
    expected = {"bad_caption_file": 1, "bad_image": 2, "empty_image": 1, "missing_caption": 2}
    assert report["skipped"] == expected == manifest(tmp_path / "out")["conversions"]["t2i"]["skipped"]
    assert (
        "1_nocaption.png has no .txt/.caption/.json side-file"
        in report["skip_examples"]["missing_caption"][0]
    )
    assert "2_latin1.txt is not UTF-8" in report["skip_examples"]["bad_caption_file"][0]


def test_missing_image_files_fields_and_rows_are_skipped(tmp_path):
    write(tmp_path / "ok.png", image_bytes(0))
    entries = [
        {"image_path": "ok.png", "txt": "fine"},
        {"image_path": "gone.png", "txt": "missing file"},
        {"image_path": "ok.png", "txt": None},
        {"image_path": None, "txt": "no path"},
        "not an object",
    ]
    write(tmp_path / "sft.json", json.dumps(entries))
    report = run(tmp_path, "t2i_sft_json", tmp_path / "sft.json")
    assert report["samples"] == 1
    assert report["skipped"] == {"bad_row": 1, "missing_caption": 1, "missing_image": 2}
    assert (
        f"{tmp_path / 'gone.png'}: No such file or directory" in report["skip_examples"]["missing_image"][0]
    )


@pytest.mark.parametrize(
    ("layout", "file", "content", "options", "message"),
    [
        (
            "jsonl",
            "in.jsonl",
            '{"image": "a.png", "text": "x"}',
            {},
            r"no 'caption' column for t2i samples.*set --caption-column",
        ),
        (
            "parquet",
            "in.parquet",
            None,
            {"image_column": "img"},
            r"no 'img' column for t2i samples \(columns: caption, image\)",
        ),
        (
            "t2i_sft_json",
            "in.json",
            '[{"image": "a.png", "annotation": "a.json"}]',
            {},
            r"no 'image_path' key \(keys: annotation, image\); is --layout t2i_sft_json right\?",
        ),
        (
            "edit_json",
            "in.json",
            '{"input_image": []}',
            {},
            "holds a JSON dict; layout edit_json needs a list",
        ),
        ("edit_json", "in.json", "[]", {}, "lists no samples"),
        ("folder", "in.json", "[]", {}, "needs a folder of images"),
        ("jsonl", "in.jsonl", "{}", {"task": "t2i", "caption_root": "."}, "--caption-root applies to"),
        ("edit_json", "in.json", "[]", {"task": "t2i"}, "holds edit samples; drop --task t2i"),
        ("mp4", "in.json", "[]", {}, "unknown layout 'mp4'"),
    ],
)
def test_user_errors_name_the_file_key_or_option(tmp_path, layout, file, content, options, message):
    if content is None:
        pq.write_table(pa.table({"image": [b""], "caption": ["x"]}), tmp_path / file)
    else:
        write(tmp_path / file, content)
    with pytest.raises(ConvertError, match=message):
        run(tmp_path, layout, tmp_path / file, **options)


def test_cli_reports_a_missing_input_in_one_line_with_exit_code_2(tmp_path):
    missing = tmp_path / "no_such_dir"
    cmd = [
        sys.executable,
        "convert.py",
        "--layout",
        "folder",
        "--input",
        str(missing),
        "--out",
        str(tmp_path / "o"),
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"convert.py: error: input {missing} does not exist"


# ----------------------------------------------------------------------------------------------------------
# End to end


def test_train_cli_runs_on_converted_shards(train_cli, tmp_path):
    data, edits = tmp_path / "t2i", []
    folder_dataset(data, 8, size=64)
    (tmp_path / "edit").mkdir()
    for i in range(4):
        rng = random.Random(100 + i)
        for name in ("src", "tgt"):
            render_scene(random_scene(rng)).save(tmp_path / "edit" / f"{i}_{name}.png")
        edits.append(
            {"input_image": [f"{i}_src.png"], "output_image": f"{i}_tgt.png", "instruction": f"edit {i}"}
        )
    write(tmp_path / "edit" / "edit.json", json.dumps(edits))
    shards = tmp_path / "shards"
    for layout, source, count in (("folder", data, 8), ("edit_json", tmp_path / "edit" / "edit.json", 4)):
        opts = ConvertOptions(layout=layout, input=str(source), out=str(shards), samples_per_shard=4)
        assert convert(opts, progress=False)["samples"] == count

    run_dir = tmp_path / "run"
    result = train_cli(
        f"data.shards_dir={shards}",
        "data.tiny_world=null",
        "trainer.max_steps=2",
        "trainer.checkpoint_every_n_steps=2",
        "trainer.log_every_n_steps=1",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Generating tiny-world shards" not in result.stdout
    assert "train/loss: mean of first" in result.stdout
    assert (run_dir / "checkpoints" / "step_000002.ckpt" / "weights.safetensors").is_file()
