"""FID's Inception-v3 and the torch-free checkpoint reader against pytorch-fid and torch.

pytorch-fid's own `InceptionV3([3])` is built with random weights (its download is replaced by
the model's own state dict), saved with `torch.save` in both formats and both key layouts (its
wrapper's `blocks.*`, and the released weights file's torchvision names with `fc.*`), read back
without torch and compared on pool3 features within float32 round-off. Nothing is downloaded.
"""

import collections
import io
import pickle
import zipfile

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pixeldance_jax.evaluate.networks import inception_fid, torch_checkpoint
from pytorch_fid import inception as pytorch_fid_inception

torch.set_num_threads(1)

TOLERANCE = 1e-4  # float32 max abs error of the features (they are O(1) here).


def _smooth_images(seed: int, n: int, height: int, width: int) -> np.ndarray:
  """Float32 `[n, height, width, 3]` in [0, 1]: a 6x6 random colour field, bicubic-upsampled.

  Images of every size then look alike after the 299x299 resize, so BatchNorm statistics
  calibrated on one set keep the features of another O(1).
  """
  low = torch.from_numpy(np.random.default_rng(seed).random((n, 3, 6, 6), dtype=np.float32))
  images = F.interpolate(low, size=(height, width), mode="bicubic", align_corners=False)
  return images.clamp(0, 1).permute(0, 2, 3, 1).numpy().copy()


def _torch_features(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(images).permute(0, 3, 1, 2))[0][:, :, 0, 0].numpy()


def _randomize(model: torch.nn.Module) -> None:
  """Random convolutions, BatchNorm scales and shifts, and running statistics set from the
  activations that calibration images reach each BatchNorm with (in eval mode, in order).

  Purely random statistics let activations grow or vanish over ~45 layers; calibrated ones
  keep features O(1) so the absolute tolerance means something. The variance is widened by
  twice its channel mean: channels nearly constant on smooth images would otherwise amplify
  float32 round-off a thousandfold.
  """
  generator = torch.Generator().manual_seed(0)

  def calibrate(norm: torch.nn.BatchNorm2d, inputs: tuple[torch.Tensor]) -> None:
    activations = inputs[0].double()
    variance = activations.var(dim=(0, 2, 3))
    spread = 0.8 + 0.4 * torch.rand(variance.shape, generator=generator, dtype=torch.float64)
    norm.running_var.copy_(variance * spread + 2.0 * variance.mean())
    noise = torch.randn(variance.shape, generator=generator, dtype=torch.float64)
    norm.running_mean.copy_(activations.mean(dim=(0, 2, 3)) + 0.1 * variance.sqrt() * noise)

  hooks = []
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.Conv2d):
        fan_in = module.weight[0].numel()
        module.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=generator)
      elif isinstance(module, torch.nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5, generator=generator)
        module.bias.normal_(0.0, 0.2, generator=generator)
        hooks.append(module.register_forward_pre_hook(calibrate))
    _torch_features(model.eval(), _smooth_images(10, 2, 64, 80))
  for hook in hooks:
    hook.remove()


@pytest.fixture(scope="module")
def reference():
  """(pytorch-fid `InceptionV3([3])` in eval mode, the torchvision `Inception3` it wraps).

  `fid_inception_v3` runs as released; only its download returns the model's own state dict.
  """
  built = []
  original = pytorch_fid_inception.torchvision.models.inception_v3

  def keep(*args, **kwargs):
    built.append(original(*args, **kwargs))
    return built[-1]

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(pytorch_fid_inception.torchvision.models, "inception_v3", keep)
    patch.setattr(pytorch_fid_inception, "load_state_dict_from_url",
                  lambda *args, **kwargs: built[-1].state_dict())
    model = pytorch_fid_inception.InceptionV3(
        [3], resize_input=True, normalize_input=True, use_fid_inception=True)
  _randomize(model)  # The wrapper's blocks are the inner model's modules.
  return model, built[-1]


@pytest.fixture(scope="module")
def weight_files(reference, tmp_path_factory):
  """{format: path}: the wrapper's state dict as a zip file, the inner model's (the released
  file's names, `fc.*` included) in the legacy format."""
  model, inner = reference
  folder = tmp_path_factory.mktemp("fid_weights")
  files = {"zip": folder / "wrapper.pth", "legacy": folder / "inception.pth"}
  torch.save(model.state_dict(), files["zip"])
  torch.save(inner.state_dict(), files["legacy"], _use_new_zipfile_serialization=False)
  yield files
  for path in files.values():  # ~90 MB each; pytest keeps the last runs' folders.
    path.unlink()


@pytest.fixture(scope="module")
def variables(weight_files):
  return jax.device_put(inception_fid.load_fid_weights(weight_files["zip"]))


_FEATURES = jax.jit(inception_fid.extract_features)


def _max_error(ours, reference) -> float:
  return float(np.abs(np.asarray(ours) - reference).max())


def test_features_match_pytorch_fid(reference, variables):
  """Two 64x80 images, upsampled to 299x299 on the way (the resize alone is compared with
  torch's at up- and downsampling sizes below)."""
  model, _ = reference
  cases = {"extract_features 64x80": (lambda images: _FEATURES(variables, images),
                                      _smooth_images(0, 2, 64, 80))}
  errors = {}
  for case, (feature_fn, images) in cases.items():
    expected = _torch_features(model, images)
    features = feature_fn(images)
    assert features.shape == (len(images), inception_fid.FEATURE_DIM)
    assert features.dtype == np.float32
    assert 0.1 < np.abs(expected).mean() < 10.0  # O(1): the tolerance is meaningful.
    errors[case] = _max_error(features, expected)
  print(f"FID Inception-v3: max abs error {errors}")
  assert max(errors.values()) <= TOLERANCE, errors


def test_both_formats_and_layouts_give_the_same_variables(weight_files, variables):
  legacy = inception_fid.load_fid_weights(weight_files["legacy"])
  flat, flat_legacy = (jax.tree_util.tree_flatten_with_path(tree)[0]
                       for tree in (variables, legacy))
  assert [path for path, _ in flat] == [path for path, _ in flat_legacy]
  assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(flat, flat_legacy))
  assert set(legacy) == {"params", "batch_stats"}
  kernel = legacy["params"]["Mixed_7c"]["branch3x3_2a"]["conv"]["kernel"]
  assert kernel.shape == (1, 3, 384, 384) and kernel.dtype == np.float32  # HWIO.
  assert legacy["batch_stats"]["Conv2d_1a_3x3"]["bn"]["var"].shape == (32,)


@pytest.mark.parametrize("size", [(64, 80), (320, 304), (299, 299), (17, 1000)])
def test_resize_matches_torch_interpolate(size):
  images = np.random.default_rng(3).random((2, *size, 3), dtype=np.float32)
  expected = F.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2), size=(299, 299),
                           mode="bilinear", align_corners=False)
  ours = inception_fid.preprocess(images)
  assert ours.shape == (2, 299, 299, 3)
  np.testing.assert_allclose(ours, 2 * expected.permute(0, 2, 3, 1).numpy() - 1, rtol=0,
                             atol=1e-6)


def test_mismatched_state_dict_lists_every_problem(reference):
  model, _ = reference
  state_dict = {name: value.numpy() for name, value in model.state_dict().items()}
  dropped = [name for name in state_dict
             if name.startswith("blocks.3.2.") and "num_batches" not in name][:12]
  for name in dropped:
    del state_dict[name]
  state_dict["blocks.0.0.conv.weight"] = np.zeros((32, 3, 3, 4), np.float32)
  state_dict["AuxLogits.fc.weight"] = np.zeros((1008, 768), np.float32)
  with pytest.raises(ValueError) as error:
    inception_fid.params_from_state_dict(state_dict)
  message = str(error.value)
  assert "12 missing, 1 unexpected, 1 misshapen" in message, message
  assert "Mixed_7c.branch1x1.conv.weight" in message, message  # Missing, by the file's name.
  assert "... and 4 more missing" in message, message  # Listing the first 8.
  assert "AuxLogits.fc.weight" in message, message
  assert "blocks.0.0.conv.weight: (32, 3, 3, 4), expected (32, 3, 3, 3)" in message, message


def test_load_fid_weights_names_a_missing_or_foreign_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere.pth"):
    inception_fid.load_fid_weights(tmp_path / "nowhere.pth")
  small = tmp_path / "small.pth"
  torch.save({"fc.weight": torch.zeros(2, 2)}, small)
  with pytest.raises(ValueError, match=r"small\.pth: .*\d+ missing"):
    inception_fid.load_fid_weights(small)


# --- torch.save reader -----------------------------------------------------------------------


def _tensors() -> collections.OrderedDict:
  """Tensors of several dtypes, sharing storages, strided, offset, empty and 0-d."""
  generator = torch.Generator().manual_seed(0)
  base = torch.randn(5, 6, generator=generator)
  return collections.OrderedDict(
      base=base, transposed=base.t(), window=base[1:, 2:5], every_other=base[:, ::2],
      half=torch.randn(3, 4, generator=generator).half(),
      bfloat16=torch.randn(7, generator=generator).bfloat16(),
      double=torch.randn(2, 3, 4, generator=generator).double(), long=torch.arange(-3, 9),
      int8=torch.arange(-4, 4, dtype=torch.int8).reshape(2, 4)[:, 1::2],
      bool=torch.tensor([True, False, True]), empty=torch.zeros(0, 3), scalar=torch.tensor(3.5),
      parameter=torch.nn.Parameter(torch.randn(2, 2, generator=generator)),
      expanded=torch.randn(3, 1, generator=generator).expand(3, 4))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_reader_matches_the_saved_tensors(tmp_path, zip_format):
  tensors = _tensors()
  path = tmp_path / "tensors.pt"
  torch.save(tensors, path, _use_new_zipfile_serialization=zip_format)
  assert zipfile.is_zipfile(path) == zip_format
  loaded = torch_checkpoint.load_state_dict(path)
  assert list(loaded) == list(tensors)
  for name, tensor in tensors.items():
    array = loaded[name]
    expected = tensor.detach()
    if tensor.dtype == torch.bfloat16:
      assert array.dtype.name == "bfloat16"
      array, expected = array.astype(np.float32), expected.float()
    assert array.dtype == expected.numpy().dtype and array.shape == tuple(tensor.shape), name
    np.testing.assert_array_equal(array, expected.numpy(), err_msg=name)
    assert array.flags.c_contiguous and array.flags.writeable, name


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_reader_refuses_other_objects(tmp_path, zip_format):
  """A pickled module would need its class (code) rebuilt: refused, not run."""
  path = tmp_path / "module.pt"
  torch.save(torch.nn.Linear(2, 2), path, _use_new_zipfile_serialization=zip_format)
  with pytest.raises(ValueError, match=r"module\.pt.*refusing to unpickle torch\.nn"):
    torch_checkpoint.load_state_dict(path)
  listed = tmp_path / "list.pt"
  torch.save([torch.zeros(2)], listed, _use_new_zipfile_serialization=zip_format)
  with pytest.raises(ValueError, match=r"list\.pt holds a list, not a state dict"):
    torch_checkpoint.load_state_dict(listed)


def test_reader_names_missing_and_foreign_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="absent.pt"):
    torch_checkpoint.load_state_dict(tmp_path / "absent.pt")
  foreign = {"text.pt": b"not a checkpoint at all", "plain.pkl": pickle.dumps({"a": 1})}
  with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
    archive.writestr("readme.txt", "hello")
  for name, data in foreign.items():
    (tmp_path / name).write_bytes(data)
  for name in (*foreign, "other.zip"):
    with pytest.raises(ValueError, match=f"{name} is not a torch.save file"):
      torch_checkpoint.load_state_dict(tmp_path / name)


# --- torch.save reader: untrusted files --------------------------------------------------------


def _zip_with_pickle(path, data_pkl: bytes, records: dict[str, bytes] | None = None,
                     compression: int = zipfile.ZIP_STORED):
  """A torch-style zip archive whose data.pkl is `data_pkl`."""
  with zipfile.ZipFile(path, "w", compression=compression) as archive:
    archive.writestr("archive/data.pkl", data_pkl)
    for name, data in (records or {}).items():
      archive.writestr(f"archive/data/{name}", data)
  return path


def test_a_small_file_cannot_ask_for_a_large_array(tmp_path):
  """A broadcast view (stride 0) of one float stands for 2^40 of them: refused before any
  allocation. A broadcast within the file's means (the `_tensors` expand) reads."""
  path = tmp_path / "bomb.pt"
  torch.save({"bomb": torch.zeros(1).expand(2**20, 2**20)}, path)
  assert path.stat().st_size < 4096
  with pytest.raises(ValueError, match=r"bomb\.pt.*broadcast or overlapping views"):
    torch_checkpoint.load_state_dict(path)
  # Sizes past any integer type, and negative ones, are refused the same way.
  for size, message in (((2**70,), "broadcast or overlapping"), ((-1,), "non-negative")):
    with pytest.raises(ValueError, match=message):
      torch_checkpoint.load(_crafted_tensor_file(tmp_path / "crafted.pt", size, (1,)))
  # Nor by setting a checked tensor's fields afterwards (BUILD).
  with pytest.raises(ValueError, match="refusing to set the state of a rebuilt object"):
    torch_checkpoint.load(_crafted_tensor_file(tmp_path / "built.pt", (1,), (1,),
                                               {"size": (2**40,), "stride": (0,)}))
  ok = torch_checkpoint.load(_crafted_tensor_file(tmp_path / "ok.pt", (1,), (1,)))
  np.testing.assert_array_equal(ok["t"], [1.0])  # The crafted file is a torch file.


_STORAGE = object()  # Pickled as the persistent id of a one-float storage "0".


class _CraftedTensor:
  """Pickles as torch pickles a tensor, with any size and stride."""

  def __init__(self, size, stride, state=None):
    self.size, self.stride, self.state = size, stride, state

  def __reduce__(self):
    return (torch._utils._rebuild_tensor_v2,  # pylint: disable=protected-access
            (_STORAGE, 0, self.size, self.stride, False, collections.OrderedDict()),
            self.state)  # A state: BUILD on the rebuilt tensor.


class _TorchLikePickler(pickle.Pickler):

  def persistent_id(self, obj):
    return ("storage", torch.FloatStorage, "0", "cpu", 1) if obj is _STORAGE else None


def _crafted_tensor_file(path, size, stride, state=None):
  buffer = io.BytesIO()
  _TorchLikePickler(buffer, protocol=2).dump({"t": _CraftedTensor(size, stride, state)})
  return _zip_with_pickle(path, buffer.getvalue(), {"0": np.float32(1).tobytes()})


def test_compressed_members_and_short_legacy_storages_are_refused(tmp_path):
  path = tmp_path / "saved.pt"
  torch.save({"w": torch.ones(64)}, path)
  with zipfile.ZipFile(path) as archive:
    members = {info.filename: archive.read(info) for info in archive.infolist()}
  deflated = tmp_path / "deflated.pt"
  with zipfile.ZipFile(deflated, "w", compression=zipfile.ZIP_DEFLATED) as archive:
    for name, data in members.items():
      archive.writestr(name, data)
  with pytest.raises(ValueError, match=r"deflated\.pt.*compressed"):
    torch_checkpoint.load_state_dict(deflated)
  # Legacy format: a storage whose element count claims more than the file holds.
  legacy = tmp_path / "legacy.pt"
  torch.save({"w": torch.ones(64)}, legacy, _use_new_zipfile_serialization=False)
  data = legacy.read_bytes()
  count = (64).to_bytes(8, "little")
  assert data.count(count) >= 1
  at = data.rindex(count)
  legacy.write_bytes(data[:at] + (2**60).to_bytes(8, "little") + data[at + 8:])
  with pytest.raises(ValueError, match=r"legacy\.pt.*claims 1152921504606846976 elements"):
    torch_checkpoint.load_state_dict(legacy)


# GLOBAL torch.FloatStorage, then BUILD {"dtype": 1} on it; the same on OrderedDict.
_SET_STORAGE_DTYPE = b"\x80\x02ctorch\nFloatStorage\n}X\x05\x00\x00\x00dtypeK\x01sb."
_SET_DICT_ATTRIBUTE = b"\x80\x02ccollections\nOrderedDict\n}X\x03\x00\x00\x00fooK\x01sb."


def test_a_pickle_cannot_change_how_the_next_file_is_read(tmp_path):
  for attack in (_SET_STORAGE_DTYPE, _SET_DICT_ATTRIBUTE):
    with pytest.raises(ValueError, match="refusing to set"):
      torch_checkpoint.load(_zip_with_pickle(tmp_path / "attack.pt", attack))
  assert not hasattr(collections.OrderedDict, "foo")
  path = tmp_path / "after.pt"
  torch.save({"w": torch.arange(4.0)}, path)
  np.testing.assert_array_equal(torch_checkpoint.load_state_dict(path)["w"], np.arange(4.0))


def test_every_failure_is_a_value_error_naming_the_file(tmp_path):
  depth = 200_000  # Nested lists: deeper than Python's recursion limit.
  nested = b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."
  cases = {"nested.pt": nested,
           "not_a_tensor.pt": b"\x80\x02ctorch._utils\n_rebuild_parameter\nK\x01\x85R.",
           "bad_storage.pt": b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(K\x01K\x00K\x01\x85"
                             b"K\x01\x85tR."}
  for name, data in cases.items():
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
      torch_checkpoint.load(_zip_with_pickle(tmp_path / name, data))
