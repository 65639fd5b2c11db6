"""InstructBLIP's Q-Former reads its learned queries, then the instruction (the calibration
prompt or caption prefix): the instruction's padding must stay out of the Q-Former's pruning
statistics, while every query position stays in."""
import pytest
import torch

import vl_models
from conftest import REPO, uniform_per_layer

FIX = REPO / "tests" / "fixtures" / "vl"
PREFIXES = ["a red", "a green box seen from above on a", "two", "a cat sitting on"]
CONTINUATIONS = [" ball", " wooden table", " blue circles", " the mat"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from ecoflap.data.files import open_image

    path = vl_models.build("instructblip", tmp_path_factory.mktemp("iblip") / "instructblip")
    images = [open_image(p) for p in sorted((FIX / "cc3m/images").glob("*.jpg"))[:4]]
    return path, images


def _load(path):
    from ecoflap.models.loading import load_model
    from ecoflap.models.registry import adapter_for

    model, procs = load_model(path, torch.device("cpu"), torch.float64)
    return model, procs, adapter_for(model)


def test_instructblip_instruction_padding_never_reaches_the_qformer_statistics(tiny):
    """Prefix calibration gives each caption its own instruction, padded to the longest; changing only
    the token ids at those padded positions once changed the Q-Former's Wanda and SparseGPT masks."""
    from ecoflap.data.calibration import batches
    from ecoflap.models.base import model_layout
    from ecoflap.pruning.engine import prune_sequential
    from ecoflap.pruning.methods import make_pruner

    path, images = tiny
    model, procs, adapter = _load(path)
    batch = adapter.prefix_calibration_batch(model, procs, images, PREFIXES, CONTINUATIONS)
    pad = batch["qformer_attention_mask"] == 0
    assert pad.any()  # the instructions differ in length
    other = dict(batch, qformer_input_ids=batch["qformer_input_ids"].masked_fill(pad, 7))
    hashes = {}
    for pruner in ("wanda", "sparsegpt"):
        for name, calib in (("padded", batch), ("other padding", other)):
            model, _, adapter = _load(path)
            per_layer = uniform_per_layer(model_layout(model, adapter), 0.5)
            hashes[pruner, name] = prune_sequential(model, adapter, make_pruner(pruner), per_layer,
                                                    batches(calib, 2), torch.device("cpu")).mask_sha256
    for pruner in ("wanda", "sparsegpt"):
        assert hashes[pruner, "padded"] == hashes[pruner, "other padding"], (
            f"{pruner}: the instruction's padding reached the Q-Former's statistics; Blip2Adapter's InstructBLIP "
            "qformer Stack needs mask_key=QFORMER_MASK with leading_real=num_query_tokens")


def test_instructblip_qformer_layers_see_every_query_and_the_real_instruction_tokens(tiny):
    """Self-attention: all queries plus the instruction's real tokens; the query FFN and the
    cross-attention's query: all queries; the text FFN: the real tokens; the cross-attention's k and
    v: every ViT token. A calibration file made before the instruction mask is refused."""
    from ecoflap.blocks.walk import feed_layers, walk_stack

    path, images = tiny
    model, procs, adapter = _load(path)
    batch = adapter.prefix_calibration_batch(model, procs, images, PREFIXES, CONTINUATIONS)
    n, q = len(PREFIXES), model.config.num_query_tokens
    real = int(batch["qformer_attention_mask"].sum())
    vision = model.config.vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    stack = next(s for s in adapter.stacks(model) if s.name == "qformer")
    for step in walk_stack(model, adapter, stack, [batch], torch.device("cpu"), None):
        rows = {}
        feed_layers(step, adapter.prunable_layers(step.block),
                    lambda name, x: rows.__setitem__(name, x.reshape(-1, x.shape[-1]).shape[0]))
        assert rows == {"attention.attention.query": n * q + real, "attention.attention.key": n * q + real,
                        "attention.attention.value": n * q + real, "attention.output.dense": n * q + real,
                        "crossattention.attention.query": n * q, "crossattention.attention.key": n * tokens,
                        "crossattention.attention.value": n * tokens, "crossattention.output.dense": n * q,
                        "intermediate_query.dense": n * q, "output_query.dense": n * q,
                        "intermediate.dense": real, "output.dense": real}, step.name
    old_file = {k: v for k, v in batch.items() if k != "qformer_text_mask"}
    with pytest.raises(ValueError, match="calibration file predates it; delete results/<model>/calibration"):
        adapter.loss(model, old_file)


def test_instructblip_instruction_width_never_equals_another_qformer_input(tiny):
    """The instruction masks are matched to layer inputs by shape: an instruction as wide as the
    queries gets one more padding column, which leaves the model's loss unchanged."""
    path, images = tiny
    model, procs, adapter = _load(path)
    q = model.config.num_query_tokens
    words = "a b c d e f g h i j k l m n o p".split()
    prefix = next(" ".join(words[:k]) for k in range(1, 16)
                  if len(procs.qformer_tokenizer(" ".join(words[:k])).input_ids) == q)
    args = (model, procs, images[:2], [prefix, "a"], [" x", " y"])
    batch = adapter.prefix_calibration_batch(*args)
    assert batch["qformer_input_ids"].shape[1] == batch["qformer_text_mask"].shape[1] == q + 1
    with torch.no_grad():
        theirs = model(**adapter._encode(*args, max_length=32, joiner="")).loss
        ours = adapter.loss(model, batch)
    assert torch.allclose(ours, theirs, atol=1e-12)


def test_instructblip_prefix_calibration_cuts_the_qformer_instruction_as_the_language_prompt(tiny):
    """LAVIS's instruct models tokenise the Q-Former's text with truncation to max_txt_len, as the
    language model's; a prefix longer than it reached the Q-Former whole."""
    path, images = tiny
    model, procs, adapter = _load(path)
    long_prefix = " ".join(["a small red house by the river"] * 8)
    batch = adapter.prefix_calibration_batch(model, procs, images[:2], [long_prefix, "two"], [" cats", " dogs"],
                                             max_length=12)
    whole = len(procs.qformer_tokenizer(long_prefix)["input_ids"])
    assert whole > 12 and batch["qformer_attention_mask"].sum(1).tolist()[0] == 12
