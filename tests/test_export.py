"""The serving export (pipeline.export, jobs.export): the bytes signature gives
what jobs.score gives for the same files (bit-identical model inputs over the
parity corpus and ordinary files, in one batch mixing sizes and formats), the
pixels signature is the scoring model call, TFLite float32 is the SavedModel,
a plain ``tf.saved_model.load`` with no project code returns labels, and what
the in-graph decode cannot match is refused or bounded as docs/export.md says.

The model is tests.small_model's (InceptionV3's export and TFLite conversion
take minutes on two CPUs; the graph around the model is the same)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from jobs import export as export_job
from jobs._cli import run
from pipeline.config import StorageConfig, load_config
from pipeline.data.preprocess import Recipe, current_recipe, file_pixels, model_inputs
from pipeline.data.images import jpeg_scale
from pipeline.export.graph import decode_upright, preprocess_bytes
from pipeline.scoring.decode import NO_ERROR, read_and_decode, to_uint8
from pipeline.scoring.predictor import ScoringPredictor
from tests import imagefactory as fx
from tests.photos import photo
from tests.test_preprocess import LIMIT, detailed, parity_corpus

CLASSES = ["circle", "square", "triangle"]
SECRET = "export-test-secret-never-written"


def ordinary_files() -> dict[str, bytes]:
    """Everyday files beside the parity corpus."""
    rng = np.random.default_rng(5)
    photo = Image.fromarray(np.clip(rng.normal(128, 50, (200, 300, 3)), 0, 255).astype(np.uint8))
    translucent = photo.convert("RGBA").resize((60, 40))
    translucent.putalpha(Image.linear_gradient("L").resize((60, 40)))
    return {
        "photo.jpg": fx.encode(photo, "JPEG", quality=85),
        "photo.png": fx.encode(photo.resize((150, 100)), "PNG"),
        "red.jpg": fx.rgb_jpeg(),
        "palette.png": fx.palette_png(),
        "rgba.png": fx.rgba_png(),
        "sixteen-bit-level.png": fx.png16(level=40000),
        "green.bmp": fx.bmp(),
        "image.webp": fx.webp(),
        "alpha.webp": fx.encode(translucent, "WEBP", lossless=True),
        "animated.gif": fx.animated_gif(),
        "exif-rotated.jpg": fx.exif_rotated_jpeg(),
    }


def all_files() -> dict[str, bytes]:
    return {**parity_corpus(), **ordinary_files()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A completed run of the small classifier, exported by the job with
    --tflite --quantize (and credentials in the config, which must not
    travel): (run directory, export folder, export.json, loaded SavedModel)."""
    from tests.small_model import write_run

    run_dir = write_run(tmp_path_factory.mktemp("run") / "run", CLASSES)
    code = run(export_job.main, ["--model", run_dir, "--tflite", "--quantize", "--top-k", "2",
                                 "--set", f"storage.secret_access_key={SECRET}",
                                 "--set", f"storage.session_token={SECRET}"])
    assert code == 0
    output = os.path.join(run_dir, "export")
    record = json.loads(Path(output, "export.json").read_text())
    return run_dir, output, record, tf.saved_model.load(output)


def scoring_path(run_dir: str, files: dict[str, bytes], folder: Path, top_k: int):
    """What jobs.score computes for ``files``, in process: read_and_decode, then
    the ScoringPredictor (uint8 images -> artifact.predict_batch). Returns
    (uint8 images, {name: {label: probability}} of the top k, {name: top-1})."""
    folder.mkdir(exist_ok=True)
    uris = []
    for name, data in files.items():
        (folder / name).write_bytes(data)
        uris.append(str(folder / name))
    predictor = ScoringPredictor(run_dir, StorageConfig(), top_k=top_k)
    batch = read_and_decode({"uri": np.array(uris, dtype=object), "size": np.full(len(uris), -1)},
                            storage=StorageConfig(), recipe=predictor.artifact.recipe, max_bytes=2**30,
                            max_pixels=LIMIT)
    assert list(batch["error"]) == [NO_ERROR] * len(uris)
    index, scores = predictor.score(np.ones(len(uris), bool), batch["image"])
    labels = [[predictor.artifact.labels[i] for i in row] for row in index]
    top = {name: dict(zip(row, map(float, s))) for name, row, s in zip(files, labels, scores)}
    return batch["image"], top, {name: row[0] for name, row in zip(files, labels)}


def as_text(values) -> list:
    return np.vectorize(lambda b: b.decode())(values.numpy()).tolist()


def test_the_bytes_signature_gives_what_scoring_gives_in_one_batch_of_mixed_sizes_and_formats(exported, tmp_path):
    run_dir, _, record, model = exported
    files = all_files()
    _, expected, top1 = scoring_path(run_dir, files, tmp_path / "files", top_k=record["top_k"])

    out = model.signatures["serving_default"](image_bytes=tf.constant(list(files.values())))
    labels, probs = as_text(out["labels"]), out["probabilities"].numpy()
    assert out["class_ids"].numpy().tolist() == [[CLASSES.index(x) for x in row] for row in labels]
    for i, name in enumerate(files):
        assert labels[i][0] == top1[name], name
        assert len(labels[i]) == 2 and probs[i].tolist() == sorted(probs[i].tolist(), reverse=True), name
        for label, p in zip(labels[i], probs[i]):
            # The issue asks for 1e-3; the inputs are bit-identical (next test), so float rounding is all.
            assert abs(p - expected[name][label]) < 1e-5, (name, label, p, expected[name])
    same = model.signatures["serving_bytes"](image_bytes=tf.constant(list(files.values())))
    np.testing.assert_array_equal(same["probabilities"].numpy(), probs)
    empty = model.signatures["serving_bytes"](image_bytes=tf.constant([], tf.string))
    assert {name: tuple(v.shape) for name, v in empty.items()} == {"labels": (0, 2), "probabilities": (0, 2),
                                                                    "class_ids": (0, 2)}


def scoring_images(tmp_path: Path, files: dict[str, bytes], recipe) -> dict:
    """``files`` written to disk and read as a score job's decode task does
    (read_and_decode): {uri, image, error}, in the order of ``files``."""
    folder = tmp_path / "files"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    uris = [str(folder / name) for name in files]
    return read_and_decode({"uri": np.array(uris, dtype=object), "size": np.full(len(uris), -1)},
                           storage=StorageConfig(), recipe=recipe, max_bytes=2**30, max_pixels=LIMIT)


def test_the_graph_makes_the_very_pixels_scoring_sends_its_model(tmp_path):
    """preprocess_bytes (what the bytes signature maps over the batch) equals
    read_and_decode's uint8 images for every file: decode, EXIF orientation,
    CMYK, alpha on white, 16-bit scaling, GIF first frame, WebP, BMP, resize."""
    files = all_files()
    recipe = current_recipe(75)
    batch = scoring_images(tmp_path, files, recipe)
    for i, (name, data) in enumerate(files.items()):
        got = preprocess_bytes(tf.constant(data), recipe, LIMIT).numpy()
        np.testing.assert_array_equal(got, batch["image"][i], err_msg=name)


def scaled_jpegs() -> dict[str, bytes]:
    """Photo-like JPEGs (tests.photos) of odd sizes, one with EXIF orientation 6
    and one CMYK, for recipes with jpeg_scale_to."""
    rng = np.random.default_rng(12)
    exif = Image.Exif()
    exif[0x0112] = 6
    turned = Image.open(io.BytesIO(photo(rng, 333, 251)))
    return {"photo-641x479.jpg": photo(rng, 641, 479), "photo-61x47.jpg": photo(rng, 61, 47),
            "photo-exif-6.jpg": fx.encode(turned, "JPEG", exif=exif.tobytes()),
            "photo-cmyk.jpg": fx.encode(turned.convert("CMYK"), "JPEG", quality=90)}


@pytest.mark.parametrize("jpeg_scale_to", [16, 75])
def test_the_graph_decodes_jpegs_at_the_recipes_scale_to_the_very_pixels_scoring_gets(tmp_path, jpeg_scale_to):
    """Recipe version 3: decode_jpeg's ratio in the graph is Pillow's draft in
    scoring, bit for bit (the same libjpeg scaled IDCT), at 1/2, 1/4 and 1/8,
    odd sizes, CMYK, gray, progressive and EXIF-turned files."""
    files = {**all_files(), **scaled_jpegs()}
    recipe = current_recipe(75, jpeg_scale_to=jpeg_scale_to)
    batch = scoring_images(tmp_path, files, recipe)
    scales = set()
    for i, (name, data) in enumerate(files.items()):
        if name.endswith(".jpg"):
            stored = Image.open(io.BytesIO(data)).size
            scales.add(jpeg_scale(*stored, jpeg_scale_to))
            upright = decode_upright(tf.constant(data), recipe, LIMIT).numpy()
            np.testing.assert_array_equal(upright, file_pixels(data, recipe, LIMIT), err_msg=name)
        got = preprocess_bytes(tf.constant(data), recipe, LIMIT).numpy()
        np.testing.assert_array_equal(got, batch["image"][i], err_msg=name)
    assert scales == {1, 2, 4, 8}, scales  # every branch of the graph's switch_case


def test_the_bytes_signature_gives_what_scoring_gives_for_a_recipe_with_jpeg_scale_to(tmp_path):
    """An export of a model whose preprocessing.json has jpeg_scale_to (prepare
    --set prepare.jpeg_scale_to=75): its bytes signature gives the top-k of
    jobs.score for the same files."""
    from pipeline.export.savedmodel import export_run
    from tests.small_model import write_run

    run_dir = write_run(tmp_path / "run", CLASSES)
    Path(run_dir, "preprocessing.json").write_text(json.dumps(current_recipe(75, jpeg_scale_to=75).to_dict()))
    files = {**scaled_jpegs(), **{name: parity_corpus()[name] for name in ("detailed-4000x3000.jpg", "baseline.jpg",
                                                                         "alpha.png")}}
    images, expected, top1 = scoring_path(run_dir, files, tmp_path / "files", top_k=2)
    record = export_run(run_dir, StorageConfig(), output=str(tmp_path / "export"), top_k=2)
    assert record["recipe"]["jpeg_scale_to"] == 75 and record["recipe"]["version"] == 3
    model = tf.saved_model.load(record["output"])
    out = model.signatures["serving_bytes"](image_bytes=tf.constant(list(files.values())))
    labels, probs = as_text(out["labels"]), out["probabilities"].numpy()
    for i, name in enumerate(files):
        assert labels[i][0] == top1[name], name
        for label, p in zip(labels[i], probs[i]):
            assert abs(p - expected[name][label]) < 1e-5, (name, label, p, expected[name])


def test_a_recipe_recorded_before_the_full_recipe_decodes_as_scoring_decodes_it():
    """Version-1 recipes: upright RGB JPEGs with TensorFlow's default IDCT and
    plain bilinear resize, other files as Pillow decodes them."""
    legacy = Recipe.from_dict({"image_size": 75})
    corpus = parity_corpus()
    for name in ("baseline.jpg", "gray.jpg", "exif-6.jpg", "alpha.png"):
        expected = to_uint8(model_inputs([file_pixels(corpus[name], legacy, LIMIT)], legacy)[0])
        got = preprocess_bytes(tf.constant(corpus[name]), legacy, LIMIT).numpy()
        np.testing.assert_array_equal(got, expected, err_msg=name)


def test_the_pixels_signature_is_the_scoring_model_call(exported, tmp_path):
    run_dir, _, _, model = exported
    images, _, _ = scoring_path(run_dir, all_files(), tmp_path / "files", top_k=3)
    predictor = ScoringPredictor(run_dir, StorageConfig(), top_k=3)
    expected = predictor.artifact.predict_batch(images.astype(np.float32))
    got = model.signatures["serving_pixels"](pixels=tf.constant(images))["probabilities"].numpy()
    assert got.shape == (len(images), len(CLASSES))
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)


def test_tflite_float32_is_the_savedmodel_and_the_quantised_file_is_close(exported, tmp_path):
    run_dir, output, record, model = exported
    assert record["tflite"] == {"float32": "model.tflite", "dynamic_range": "model-dynamic-range.tflite"}
    images, _, _ = scoring_path(run_dir, all_files(), tmp_path / "files", top_k=3)
    expected = model.signatures["serving_pixels"](pixels=tf.constant(images))["probabilities"].numpy()
    answers = {}
    for kind, name in record["tflite"].items():
        interpreter = tf.lite.Interpreter(model_path=os.path.join(output, name))
        runner = interpreter.get_signature_runner("serving_pixels")
        assert interpreter.get_input_details()[0]["dtype"] == np.uint8
        ops = {op["op_name"] for op in interpreter._get_ops_details()}
        assert "CONV_2D" in ops and not ops & {"IF", "WHILE"}, ops  # a plain graph (delegates take all of it)
        answers[kind] = np.concatenate([runner(pixels=images[i:i + 1])["probabilities"] for i in range(len(images))])
    np.testing.assert_allclose(answers["float32"], expected, atol=1e-4, rtol=0)
    assert np.abs(answers["dynamic_range"] - expected).max() < 0.05
    assert Path(output, "model.tflite").read_bytes() != Path(output, "model-dynamic-range.tflite").read_bytes()
    assert Path(output, "labels.txt").read_text().split("\n")[:-1] == CLASSES


PLAIN_LOAD = """
import json, sys
import tensorflow as tf
model = tf.saved_model.load(sys.argv[1])
out = model.signatures["serving_default"](image_bytes=tf.constant([open(p, "rb").read() for p in sys.argv[2:]]))
print(json.dumps({
    "labels": [[x.decode() for x in row] for row in out["labels"].numpy()],
    "probabilities": out["probabilities"].numpy().tolist(),
    "variable": [x.decode() for x in model.labels.numpy()],
    "project": sorted(n for n in sys.modules if n.split(".")[0] in ("pipeline", "jobs", "tests")),
}))
"""


def test_a_plain_saved_model_load_without_project_code_returns_labels(exported, tmp_path):
    run_dir, output, _, model = exported
    files = {name: all_files()[name] for name in ("baseline.jpg", "alpha.png", "exif-6.jpg", "image.webp")}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    done = subprocess.run([sys.executable, "-c", PLAIN_LOAD, output, *[str(tmp_path / n) for n in files]],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["project"] == [] and got["variable"] == CLASSES
    here = model.signatures["serving_default"](image_bytes=tf.constant(list(files.values())))
    assert got["labels"] == as_text(here["labels"])
    np.testing.assert_allclose(got["probabilities"], here["probabilities"].numpy(), atol=1e-6)
    assets = Path(output, "assets")
    assert json.loads((assets / "labels.json").read_text()) == CLASSES
    assert Recipe.from_dict(json.loads((assets / "preprocessing.json").read_text())) == current_recipe(75)


def transparent_gif() -> bytes:
    img = Image.new("P", (20, 10))
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255])
    img.putdata([0, 1, 2, 1] * 50)
    return fx.encode(img, "GIF", transparency=0)


def test_what_the_graph_cannot_match_is_refused_with_a_reason(exported):
    """docs/export.md, "Where it differs": a GIF with a transparent colour,
    files TensorFlow cannot decode and images over prepare.max_pixels fail
    the request with an InvalidArgument error saying why; never a silent
    different answer."""
    model = exported[3].signatures["serving_default"]
    assert Image.open(io.BytesIO(transparent_gif())).info.get("transparency") == 0  # Pillow would composite it
    with pytest.raises(tf.errors.InvalidArgumentError, match="GIF with a transparent colour"):
        model(image_bytes=tf.constant([fx.rgb_jpeg(), transparent_gif()]))
    for bad in (fx.random_bytes(), fx.tiff(), b""):
        with pytest.raises(tf.errors.InvalidArgumentError):
            model(image_bytes=tf.constant([bad]))
    recipe = current_recipe(75)
    for name, data in (("JPEG", fx.rgb_jpeg(size=(40, 30))), ("PNG", fx.palette_png(size=(40, 30))),
                       ("image", fx.bmp(size=(40, 30)))):
        assert preprocess_bytes(tf.constant(data), recipe, 1200).shape == (75, 75, 3)
        with pytest.raises(tf.errors.InvalidArgumentError, match=f"{name}: more pixels than 1199"):
            preprocess_bytes(tf.constant(data), recipe, 1199)


def test_max_side_differs_from_pillows_lanczos_within_the_stated_bound():
    """With ``max_side`` (prepare --max-side) Pillow shrinks with its Lanczos,
    the graph with TensorFlow's: same target size, and after the resize to
    model size the model inputs are at most 3 levels apart (docs/export.md)."""
    recipe = current_recipe(75, max_side=64)
    files = {"detailed.jpg": fx.encode(detailed(300, 200, seed=4), "JPEG", quality=90),
             **{name: parity_corpus()[name] for name in ("baseline.jpg", "alpha.png", "exif-6.jpg")}}
    worst = 0
    for name, data in files.items():
        expected = to_uint8(model_inputs([file_pixels(data, recipe, LIMIT)], recipe)[0]).astype(int)
        got = preprocess_bytes(tf.constant(data), recipe, LIMIT).numpy().astype(int)
        worst = max(worst, int(np.abs(got - expected).max()))
    assert 0 < worst <= 3, worst


def test_the_export_job_writes_a_complete_export_without_secrets(exported):
    run_dir, output, record, _ = exported
    files = sorted(str(p.relative_to(output)) for p in Path(output).rglob("*") if p.is_file())
    assert files == sorted(record["files"] + ["export.json"])
    assert {"saved_model.pb", "variables/variables.index", "assets/labels.txt", "model.tflite"} <= set(files)
    assert record["labels"] == CLASSES and record["top_k"] == 2 and record["image_size"] == 75
    assert record["model"] == run_dir and record["recipe"] == current_recipe(75).to_dict()
    for path in Path(output).rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_a_bad_model_reference_is_exit_2_and_the_training_hook_exports_a_run_being_published(tmp_path, capsys):
    from jobs.train import serving_export
    from tests.small_model import write_run

    assert run(export_job.main, ["--model", str(tmp_path / "missing")]) == 2
    run_dir = write_run(tmp_path / "run", CLASSES)
    os.remove(os.path.join(run_dir, "summary.json"))  # published, not yet complete: what the driver exports
    assert run(export_job.main, ["--model", run_dir]) == 2
    assert "not a completed training run" in capsys.readouterr().err
    out = serving_export(load_config(None, ["train.export=true"]))(run_dir)
    assert out == os.path.join(run_dir, "export")
    record = json.loads(Path(out, "export.json").read_text())
    assert record["labels"] == CLASSES and record["tflite"] == {}
    assert not Path(out, "model.tflite").exists()


def test_a_registry_version_is_exported_into_its_own_folder(tmp_path):
    """``REGISTRY#name`` exports its production version into the version's
    folder (``versions/VERSION/export/``), recording the version it was."""
    from pipeline import registry as reg
    from tests.small_model import write_run

    storage = StorageConfig()
    registry = str(tmp_path / "registry")
    run_dir = write_run(tmp_path / "run", CLASSES)
    version = reg.register_run(registry, "shapes", run_dir, storage, metrics={"accuracy": 0.5}, data="shards")
    reg.promote(registry, "shapes", version["version"], storage, reason="test")
    assert run(export_job.main, ["--model", f"{registry}#shapes"]) == 0
    folder = Path(reg.version_uri(registry, "shapes", version["version"]))
    record = json.loads((folder / "export" / "export.json").read_text())
    assert record["model"] == f"{registry}#shapes@{version['version']}" and record["labels"] == CLASSES
    assert (folder / "export" / "saved_model.pb").is_file() and not (Path(run_dir) / "export").exists()


def test_an_export_to_object_storage_loads_from_a_copy(tmp_path, s3_bucket):
    """--output on S3: every file arrives, export.json among them, and a copy
    of the folder loads and answers."""
    from tests.small_model import write_run

    fs, bucket = s3_bucket
    run_dir = write_run(tmp_path / "run", CLASSES)
    assert run(export_job.main, ["--model", run_dir, "--output", f"s3://{bucket}/serving/shapes/1"]) == 0
    record = json.loads(fs.cat(f"{bucket}/serving/shapes/1/export.json"))
    listed = sorted(p.split("/serving/shapes/1/", 1)[1] for p in fs.find(f"{bucket}/serving/shapes/1"))
    assert listed == sorted(record["files"] + ["export.json"])
    fs.get(f"{bucket}/serving/shapes/1/", str(tmp_path / "copy"), recursive=True)
    model = tf.saved_model.load(str(tmp_path / "copy"))
    out = model.signatures["serving_default"](image_bytes=tf.constant([fx.rgb_jpeg()]))
    assert as_text(out["labels"])[0][0] in CLASSES
