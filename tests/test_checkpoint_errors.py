"""tfmq.quant.checkpoint: a missing, truncated, foreign or damaged checkpoint file is refused with one
``CheckpointError`` line that names the file and what is wrong (no safetensors / JSON traceback), before the
FP model is touched where that is possible."""
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import tfmq
from engine_fixtures import quantized, tiny_unet
from tfmq.quant.checkpoint import CheckpointError, CheckpointMismatchError, CheckpointNotFoundError
from tfmq.quant.prepare import is_quantized

pytestmark = pytest.mark.usefixtures("one_thread")

WEIGHTS, HEADER = "quantized.safetensors", "quant_config.json"


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "tfmq"
    tfmq.save(quantized("uncond", "tfmq"), path)
    return path


@pytest.fixture
def ckpt(good_ckpt, tmp_path):
    """A private copy to damage."""
    return shutil.copytree(good_ckpt, tmp_path / "ckpt")


def _tensors(path):
    with safe_open(str(path / WEIGHTS), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _refused(path, error=CheckpointError, match=""):
    """Load onto a fresh FP model; return the error after checking it is one line naming a file of ``path``."""
    fp = tiny_unet("uncond")
    with pytest.raises(error, match=match) as info:
        tfmq.load(path, fp)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg, msg
    chained = info.value.__cause__ or (None if info.value.__suppress_context__ else info.value.__context__)
    assert chained is None, repr(chained)  # no library traceback printed above the one line
    return info.value, fp


def test_the_good_checkpoint_loads(ckpt):
    assert is_quantized(tfmq.load(ckpt, tiny_unet("uncond")))  # the damage below is what breaks the others


@pytest.mark.parametrize("name", [HEADER, WEIGHTS])
def test_missing_file(ckpt, name):
    (ckpt / name).unlink()
    e, fp = _refused(ckpt, CheckpointNotFoundError, match=f"{name}: no quantized")
    assert isinstance(e, FileNotFoundError) and isinstance(e, ValueError)  # old and new callers both catch it
    assert str(ckpt / name) in str(e) and not is_quantized(fp)


def test_missing_directory(tmp_path):
    _refused(tmp_path / "nothing", CheckpointNotFoundError, match=HEADER)


@pytest.mark.parametrize("keep", [0.5, 0.999, 8, 0])
def test_truncated_safetensors(ckpt, keep):
    data = (ckpt / WEIGHTS).read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    assert n < len(data)
    (ckpt / WEIGHTS).write_bytes(data[:n])
    e, fp = _refused(ckpt, match=r"quantized\.safetensors: unreadable safetensors file .*truncated or damaged")
    assert str(ckpt / WEIGHTS) in str(e) and not is_quantized(fp)


def test_garbage_instead_of_safetensors(ckpt):
    (ckpt / WEIGHTS).write_bytes(b"<html>404 not found</html>" * 10)
    _refused(ckpt, match="unreadable safetensors file")


def test_safetensors_that_is_not_a_tfmq_checkpoint(ckpt):
    """E.g. an FP model's weights copied under the checkpoint's name."""
    save_file({k: v.contiguous() for k, v in tiny_unet("uncond").state_dict().items()}, str(ckpt / WEIGHTS))
    e, fp = _refused(ckpt, match=r"quantized\.safetensors: safetensors metadata format=None.*not a tfmq quantized checkpoint")
    assert not is_quantized(fp)


def test_safetensors_of_another_format_version(ckpt):
    tensors, meta = _tensors(ckpt)
    save_file(tensors, str(ckpt / WEIGHTS), metadata={**meta, "format_version": "7"})
    _refused(ckpt, CheckpointMismatchError, match=r"quantized\.safetensors: format_version='7', this tfmq reads versions 1 and 2")


@pytest.mark.parametrize("text", ["{\"format\": \"tfmq-quantized-unet\", ", "", "\xff\xfe\x00garbage"])
def test_header_that_is_not_json(ckpt, text):
    (ckpt / HEADER).write_bytes(text.encode("latin-1"))
    e, fp = _refused(ckpt, match=r"quant_config\.json: not valid JSON .*damaged")
    assert str(ckpt / HEADER) in str(e) and not is_quantized(fp)
    with pytest.raises(CheckpointError, match="not valid JSON"):
        tfmq.read_header(ckpt)


@pytest.mark.parametrize("header,match", [
    ({"_class_name": "UNet2DModel", "block_out_channels": [8, 16]}, "format=None, expected 'tfmq-quantized-unet'"),
    ([1, 2, 3], "format='list'"),
])
def test_header_of_something_else(ckpt, header, match):
    (ckpt / HEADER).write_text(json.dumps(header))
    _refused(ckpt, match=r"quant_config\.json: " + match)


def test_header_of_another_format_version(ckpt):
    header = json.loads((ckpt / HEADER).read_text())
    (ckpt / HEADER).write_text(json.dumps({**header, "format_version": 3}))
    e, fp = _refused(ckpt, CheckpointMismatchError, match=r"quant_config\.json: format_version=3, this tfmq reads versions 1 and 2")
    assert not is_quantized(fp)


@pytest.mark.parametrize("field", ["layers", "fp_fingerprint", "config"])
def test_header_missing_a_field(ckpt, field):
    header = json.loads((ckpt / HEADER).read_text())
    del header[field]
    (ckpt / HEADER).write_text(json.dumps(header))
    _refused(ckpt, match=rf"quant_config\.json: field\(s\) {field} missing")


def test_header_with_a_bad_config(ckpt):
    header = json.loads((ckpt / HEADER).read_text())
    header["config"]["weight_bits"] = 1
    (ckpt / HEADER).write_text(json.dumps(header))
    _refused(ckpt, match=r"quant_config\.json: config: .*weight_bits")


def _rewrite(ckpt, change):
    tensors, meta = _tensors(ckpt)
    change(tensors)
    save_file(tensors, str(ckpt / WEIGHTS), metadata=meta)


def test_tensor_missing(ckpt):
    key = "mid_block.resnets.0.conv1.wq.0.w_packed"
    _rewrite(ckpt, lambda t: t.pop(key))
    _refused(ckpt, match=r"quantized\.safetensors: mid_block\.resnets\.0\.conv1: wq\.0: tensor 'w_packed' is missing")


def test_tensor_of_the_wrong_shape(ckpt):
    key = "mid_block.resnets.0.conv1.wq.0.scale"
    _rewrite(ckpt, lambda t: t.update({key: t[key][:3]}))
    _refused(ckpt, match=r"mid_block\.resnets\.0\.conv1: wq\.0: tensor 'scale' has shape \(3, 1, 1, 1\), expected \(16, 1, 1, 1\)")


def test_tensor_the_header_does_not_describe(ckpt):
    _rewrite(ckpt, lambda t: t.update({"conv_in.wq.0.w_int": torch.zeros(3, dtype=torch.uint8)}))
    _refused(ckpt, match=r"quantized\.safetensors: 1 tensor\(s\) the header does not describe \(e\.g\. \['conv_in\.wq\.0\.w_int'\]\)")


def test_activation_table_entry_damaged(ckpt):
    header = json.loads((ckpt / HEADER).read_text())
    name = next(n for n, m in header["act_quantizers"].items() if m == "table")
    header["act_quantizers"][name] = "per_channel"
    (ckpt / HEADER).write_text(json.dumps(header))
    _refused(ckpt, match=rf"{name.replace('.', chr(92) + '.')}: activation quantizer mode='per_channel'")


def test_layer_entry_damaged(ckpt):
    header = json.loads((ckpt / HEADER).read_text())
    header["layers"]["mid_block.resnets.0.conv1"] = "int"
    (ckpt / HEADER).write_text(json.dumps(header))
    _refused(ckpt, match=r"quantized\.safetensors: mid_block\.resnets\.0\.conv1: layer entry 'int', expected a dict")


def test_feature_cache_naming_a_module_the_model_lacks(tmp_path):
    path = tmp_path / "cached"
    tfmq.save(quantized("uncond", "tfmq", cached_temporal_features=True), path)
    header = json.loads((path / HEADER).read_text())
    assert len(header["feature_cache"]) > 1
    header["feature_cache"][1] = "down_blocks.7.resnets.0.time_emb_proj"
    (path / HEADER).write_text(json.dumps(header))
    _refused(path, match=r"tfmq_feature_cache: module\(s\) \['down_blocks\.7\.resnets\.0\.time_emb_proj'\] .* not in this model")


def test_verify_checkpoint_without_a_model(ckpt):
    """``tfmq.verify_checkpoint``: the good checkpoint's header; each damage gives the one line ``load`` gives."""
    assert tfmq.verify_checkpoint(ckpt) == tfmq.read_header(ckpt)
    data = (ckpt / WEIGHTS).read_bytes()
    (ckpt / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"quantized\.safetensors: unreadable safetensors file .*truncated") as info:
        tfmq.verify_checkpoint(ckpt)
    assert "\n" not in str(info.value) and str(ckpt / WEIGHTS) in str(info.value)
    save_file({k: v.contiguous() for k, v in tiny_unet("uncond").state_dict().items()}, str(ckpt / WEIGHTS))
    with pytest.raises(CheckpointError, match="not a tfmq quantized checkpoint"):
        tfmq.verify_checkpoint(ckpt)
    (ckpt / HEADER).unlink()
    with pytest.raises(CheckpointNotFoundError, match=f"{HEADER}: no quantized"):
        tfmq.verify_checkpoint(ckpt)
