"""CLIP text encoder and tokenizer against transformers' CLIPTextModel and CLIPTokenizer.

Tiny random CLIPTextModels go through safetensors and `convert`; outputs must agree within
float32 round-off. The reference CLIPTokenizer is built from the BPE merges that
`instant_clip_tokenizer` ships, so nothing is downloaded.
"""

import json
import pathlib

import instant_clip_tokenizer
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from configs import unit_test
from pixeldance_jax.data import tokenizer
from pixeldance_jax.convert import layouts
from pixeldance_jax.models import text_encoder

TOLERANCE = 1e-4  # float32 max abs error.
VOCAB, LENGTH, EOS = 1000, 16, 999
NUM_MERGES = 49152 - 256 - 2  # The merges OpenAI's SimpleTokenizer reads.


def _spec(hidden_act: str, use_penultimate_layer: bool = False) -> text_encoder.TextEncoderSpec:
  return text_encoder.TextEncoderSpec(
      vocab_size=VOCAB, max_length=LENGTH, hidden_size=32, intermediate_size=37, num_layers=2,
      num_heads=4, hidden_act=hidden_act, use_penultimate_layer=use_penultimate_layer)


def _token_ids() -> np.ndarray:
  """int `[3, LENGTH]`: random ids, an EOS in each row, then EOS padding (as pad == EOS)."""
  ids = np.random.default_rng(0).integers(0, EOS, (3, LENGTH))
  for row, eos_at in enumerate((5, 11, LENGTH - 1)):
    ids[row, eos_at:] = EOS
  return ids


@pytest.fixture(scope="module", params=["quick_gelu", "gelu"])
def torch_clip(request, tmp_path_factory):
  """(hidden_act, CLIPTextModel, its state dict read back from save_pretrained's safetensors)."""
  torch.manual_seed(0)
  config = transformers.CLIPTextConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=LENGTH, hidden_act=request.param,
      bos_token_id=EOS - 1, eos_token_id=EOS, attn_implementation="eager")
  model = transformers.CLIPTextModel(config).eval()
  with torch.no_grad():  # LayerNorms start at (1, 0); random ones test the scale/bias mapping.
    for name, value in model.named_parameters():
      if "norm" in name:
        value.add_(0.1 * torch.randn_like(value))
  folder = tmp_path_factory.mktemp(f"clip_{request.param}")
  model.save_pretrained(folder)  # transformers 5 writes safetensors only, without `text_model.`.
  return request.param, model, layouts.load_safetensors_folder(folder)


def _hub_layout(state_dict: dict) -> dict:
  """The `text_model.`-prefixed names of Hub checkpoints and transformers < 5."""
  return {f"text_model.{name}": value for name, value in state_dict.items()}


def _torch_outputs(model, ids: np.ndarray):
  with torch.no_grad():
    out = model(torch.as_tensor(ids), output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1  # Embeddings first.
    # diffusers' clip_skip=1: hidden_states[-(clip_skip + 1)] through final_layer_norm.
    penultimate = model.final_layer_norm(out.hidden_states[-2])
  return out.last_hidden_state.numpy(), penultimate.numpy(), out.pooler_output.numpy()


def _max_error(ours, reference) -> float:
  return float(np.abs(np.asarray(ours) - reference).max())


def test_matches_clip_text_model(torch_clip):
  hidden_act, model, state_dict = torch_clip
  ids = _token_ids()
  last, penultimate, pooled = _torch_outputs(model, ids)
  errors = {}
  for use_penultimate, reference in ((False, last), (True, penultimate)):
    spec = _spec(hidden_act, use_penultimate)
    for layout, weights in (("v5", state_dict), ("hub", _hub_layout(state_dict))):
      params = layouts.clip_params_from_torch_state_dict(weights, spec)
      ours = text_encoder.TextEncoder(spec).apply({"params": params}, jnp.asarray(ids))
      errors[f"{'penultimate' if use_penultimate else 'last'}/{layout}"] = _max_error(
          ours, reference)
    if not use_penultimate:
      pooled_ours = text_encoder.pool_at_first_eos(ours, jnp.asarray(ids), EOS)
      errors["pooled"] = _max_error(pooled_ours, pooled)
  print(f"{hidden_act}: max abs error {errors}")
  assert max(errors.values()) <= TOLERANCE, errors
  # Fails if the option were ignored: the two references differ by far more than round-off.
  assert _max_error(penultimate, last) > 100 * TOLERANCE


def test_converted_tree_is_the_model_tree(torch_clip):
  hidden_act, _, state_dict = torch_clip
  for use_penultimate in (False, True):
    spec = _spec(hidden_act, use_penultimate)
    params = layouts.clip_params_from_torch_state_dict(state_dict, spec)
    shapes = lambda tree: {k: v.shape for k, v in _flatten(tree).items()}
    assert shapes(params) == shapes(text_encoder.param_shapes(spec))
    assert all(v.dtype == np.float32 for v in _flatten(params).values())


def _flatten(tree, prefix=()) -> dict:
  if not isinstance(tree, dict):
    return {prefix: tree}
  return {k: v for name, sub in tree.items() for k, v in _flatten(sub, prefix + (name,)).items()}


def test_converter_lists_every_mismatch(torch_clip):
  hidden_act, _, state_dict = torch_clip
  broken = _hub_layout(state_dict)
  broken["text_model.encoder.layers.0.self_attn.query.weight"] = broken.pop(
      "text_model.encoder.layers.0.self_attn.q_proj.weight")
  del broken["text_model.final_layer_norm.bias"]
  broken["text_model.encoder.layers.1.mlp.fc1.weight"] = np.zeros((37, 33), np.float32)
  broken["text_projection.weight"] = np.zeros((32, 32), np.float32)
  broken["encoder.layers.1.mlp.fc2.bias"] = state_dict["encoder.layers.1.mlp.fc2.bias"]
  with pytest.raises(ValueError) as error:
    layouts.clip_params_from_torch_state_dict(broken, _spec(hidden_act))
  message = str(error.value)
  for expected in ("layers_0/q_proj/kernel", "text_model.encoder.layers.0.self_attn.query.weight",
                   "final_layer_norm/bias", "text_model.encoder.layers.1.mlp.fc1.weight",
                   "text_projection.weight", "duplicate: "):
    assert expected in message, message


def test_penultimate_needs_the_full_depth_checkpoint(torch_clip):
  """A 1-layer checkpoint under a 2-layer penultimate spec is a mismatch, not a silent match."""
  hidden_act, _, state_dict = torch_clip
  shallow = {k: v for k, v in state_dict.items() if ".layers.1." not in k}
  with pytest.raises(ValueError, match="layers_1"):
    layouts.clip_params_from_torch_state_dict(shallow, _spec(hidden_act, True))


def test_spec_from_config_checks_the_penultimate_option():
  """(A checkpoint's config from before the option existed gets False from
  `checkpoints.ADDED_KEYS`.)"""
  config = unit_test.get_config()
  assert not text_encoder.TextEncoderSpec.from_config(config).use_penultimate_layer
  config.text_encoder.use_penultimate_layer = True  # unit_test has a single layer.
  with pytest.raises(ValueError, match="num_layers >= 2"):
    text_encoder.TextEncoderSpec.from_config(config)
  config.text_encoder.num_layers = 2
  assert text_encoder.TextEncoderSpec.from_config(config).num_layers_run == 1


# --- Tokenizer -----------------------------------------------------------------------------


def _bytes_to_unicode() -> list[str]:
  """OpenAI CLIP's byte -> printable character table, in its vocabulary order."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  others = [b for b in range(256) if b not in printable]
  return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def _bundled_merges() -> list[str]:
  """The BPE merges of OpenAI's bpe_simple_vocab_16e6.txt, embedded in the extension."""
  library = next(pathlib.Path(instant_clip_tokenizer.__file__).parent.glob("*.so"))
  data = library.read_bytes()
  start = data.index(b"#version: 0.2\n")
  lines = data[start:start + 4_000_000].split(b"\n")[1:NUM_MERGES + 1]
  return [line.decode("utf-8") for line in lines]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
  """transformers' CLIPTokenizer over the same vocabulary, built as OpenAI's SimpleTokenizer."""
  merges = _bundled_merges()
  units = _bytes_to_unicode()
  vocab = [*units, *(u + "</w>" for u in units), *(m.replace(" ", "") for m in merges),
           "<|startoftext|>", "<|endoftext|>"]
  assert len(vocab) == len(set(vocab)) == 49408
  folder = tmp_path_factory.mktemp("clip_tokenizer")
  (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
  (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
  return transformers.CLIPTokenizer.from_pretrained(str(folder))


PROMPTS = [
    "",
    "a photo of a cat",
    "A Photo Of A CAT, in the Style of Van Gogh!!!",
    "Hello, world... it's 3:45pm; she'd've paid $1,234.56 (20% off) #sale @shop",
    "don't   stop\tthe\nmusic  ",
    "under_score-dash/slash\\back <angle> [square] {curly} 'quotes' \"double\"",
    "3D render, 4K, 1080p, 16:9, 2x2=4",
    "café naïve résumé Ørsted straße",
    "cafe\u0301 (decomposed accent)",
    "emoji 🐶🐱👍🏽 and 中文字符 and 日本語 and 한국어",
    "&amp; &lt;tag&gt;",
    "x <|endoftext|> y<|startoftext|>z",
    "\u00a0nbsp\u2003em\u3000ideographic\x1cfile-separator",
    "ﬁ ligature ＡＢＣ fullwidth Ⅻ ½ ²",
    "a very long prompt " * 30,
    "word " * 75,  # 75 BPE tokens + BOS + EOS: exactly 77, not truncated.
    "word " * 76,  # One too many.
]


def test_tokenizer_matches_clip_tokenizer(hf_tokenizer):
  reference = hf_tokenizer(PROMPTS, max_length=77, padding="max_length", truncation=True)
  ours = tokenizer.tokenize(PROMPTS, 77)
  for prompt, expected, row in zip(PROMPTS, reference["input_ids"], ours):
    np.testing.assert_array_equal(row, expected, err_msg=repr(prompt))
  assert hf_tokenizer.pad_token_id == tokenizer.END_OF_TEXT


def test_tokenizer_reports_truncation(caplog):
  assert tokenizer.encode("word " * 75, 77) == ([49406] + [2653] * 75 + [49407], False)
  ids, truncated = tokenizer.encode("word " * 76, 77)
  assert truncated and len(ids) == 77 and ids[-1] == tokenizer.END_OF_TEXT
  tokenizer.tokenize(["word " * 76, "short"], 77)
  assert "Truncated 1 of 2 texts" in caplog.text


def test_final_sigma_follows_openai_not_clip_tokenizer(hf_tokenizer):
  """Known divergence: OpenAI CLIP lower-cases with Python (word-final "Σ" -> "ς", id 480);
  CLIPTokenizer's Rust lower-casing gives "σ" (id 481). Ours keeps the trained behaviour."""
  ours = tokenizer.tokenize(["ΣΟΦΟΣ"], 16)[0]
  theirs = hf_tokenizer("ΣΟΦΟΣ")["input_ids"]
  assert ours[10] == 480 and theirs[10] == 481
  np.testing.assert_array_equal(ours[:10], theirs[:10])
