"""Vision-language families end to end on tiny random models built in code: calibrate on
image-caption pairs, score, allocate (one budget or one per sub-model), prune, evaluate on
fixture files in the official formats, all through the same CLI the workflow calls."""
import json

import pytest
import torch

import vl_models
from conftest import REPO, uniform_per_layer
from ecoflap.cli import main

FIX = REPO / "tests" / "fixtures" / "vl"
EVALS = {
    "vqav2": {"task": "vqa", "dataset": "vqav2", "questions": str(FIX / "vqav2/v2_OpenEnded_mscoco_val2014_questions.json"),
              "annotations": str(FIX / "vqav2/v2_mscoco_val2014_annotations.json"),
              "image_dir": str(FIX / "coco/val2014"), "max_new_tokens": 3, "batch_size": 2},
    "nocaps": {"task": "caption", "dataset": "nocaps", "annotations": str(FIX / "nocaps/nocaps_val_4500_captions.json"),
               "image_dir": str(FIX / "nocaps/images"), "max_new_tokens": 5, "batch_size": 2},
    "flickr30k": {"task": "retrieval", "dataset": "flickr30k", "karpathy_json": str(FIX / "karpathy/dataset_flickr30k.json"),
                  "image_dir": str(FIX / "flickr30k/flickr30k-images")},
    "imagenet": {"task": "classification", "dataset": "imagenet", "val_dir": str(FIX / "imagenet/val"), "limit": 3,
                 "templates": "simple"},
}
TASKS = {"blip2_opt": ["vqav2", "nocaps"], "blip2_t5": ["vqav2", "nocaps"], "instructblip": ["vqav2"],
         "clip": ["flickr30k", "imagenet"], "blip2_retrieval": ["flickr30k"], "blip_caption": ["nocaps"],
         "blip_vqa": ["vqav2"], "blip_retrieval": ["flickr30k"]}


def _run(*args):
    main(["--threads", "2", *map(str, args)])


def _expected_by_submodel(model_dir, layer_sparsity):
    """What Wanda must reach: in every row of a layer, round(columns x ratio) weights pruned
    (so tiny 32-column layers land within 1/64 of their ratio; real layers far closer)."""
    from ecoflap.models.registry import adapter_for
    from ecoflap.models.layout import skeleton_of_folder
    from ecoflap.pruning.masks import row_prune_count

    skeleton = skeleton_of_folder(model_dir)
    adapter = adapter_for(skeleton)
    sub_of_block = adapter.submodel_of_block(skeleton)
    zeros, sizes = {}, {}
    for block, module in adapter.named_blocks(skeleton):
        for name, layer in adapter.prunable_layers(module).items():
            full = f"{block}.{name}"
            if full in layer_sparsity:
                rows, cols = layer.weight.shape
                g = sub_of_block[block]
                zeros[g] = zeros.get(g, 0) + rows * row_prune_count(cols, layer_sparsity[full])
                sizes[g] = sizes.get(g, 0) + rows * cols
    return {g: zeros[g] / sizes[g] for g in sizes}, sum(zeros.values()) / sum(sizes.values())


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """Download (local copy), layout and calibration for every tiny family, once."""
    out = {}
    for kind in TASKS:
        work = tmp_path_factory.mktemp(kind)
        src = vl_models.build(kind, work / "src")
        _run("download", "--spec", json.dumps({"source": "local", "path": str(src)}), "--out", work / "model",
             "--layout", work / "layout.json")
        _run("calibrate", "--model", work / "model", "--source", "cc3m", "--pairs", FIX / "cc3m/pairs.tsv",
             "--image-root", FIX / "cc3m", "--n-samples", 4, "--prompt", "a photo of", "--out", work / "calib.safetensors")
        out[kind] = work
    return out


@pytest.mark.parametrize("kind", list(TASKS))
def test_score_allocate_prune_evaluate(pipelines, kind):
    work = pipelines[kind]
    common = ["--model", work / "model", "--device", "cpu", "--dtype", "float32", "--calibration", work / "calib.safetensors"]
    _run("score", *common, "--kind", "zeroth_order", "--granularity", "block", "--no-reuse-block-inputs", "--batch-size", 2, "--out", work / "zo.json")
    scores = json.loads((work / "zo.json").read_text())["scores"]
    layout = json.loads((work / "layout.json").read_text())
    # fp32 finite differences of a random tiny model can round to 0 for the vision blocks
    assert set(scores) == set(layout["layout"]) and all(v >= 0 for v in scores.values()) and sum(scores.values()) > 0
    _run("allocate", "--layout", work / "layout.json", "--kind", "ecoflap", "--scores", work / "zo.json", "--target", 0.5,
         "--out", work / "alloc.json")
    _run("prune", *common, "--allocation", work / "alloc.json", "--pruner", "wanda", "--batch-size", 2,
         "--out", work / "pruned", "--report", work / "pruning.json")
    report = json.loads((work / "pruning.json").read_text())
    alloc = json.loads((work / "alloc.json").read_text())
    assert alloc["planned_global_sparsity"] == pytest.approx(0.5, abs=1e-6)
    by_sub, overall = _expected_by_submodel(work / "model", alloc["layer_sparsity"])
    assert report["global_sparsity"] == pytest.approx(overall, abs=1e-9)
    assert report["submodel_sparsity"] == pytest.approx(by_sub, abs=1e-9)
    for name in TASKS[kind]:
        _run("evaluate", "--model", work / "pruned", "--device", "cpu", "--dtype", "float32", "--task",
             EVALS[name]["task"], "--spec", json.dumps(EVALS[name]), "--out", work / f"{name}.json")
        result = json.loads((work / f"{name}.json").read_text())
        metrics = result["metrics"]
        # the data files' hashes beside the model's (only the model's were recorded before)
        files = {k for k in ("questions", "annotations", "karpathy_json") if k in EVALS[name]}
        assert set(result["provenance"]["input_sha256"]) == {"model", *files}
        main_metric = {"vqav2": "accuracy", "nocaps": "CIDEr", "flickr30k": "TR@1", "imagenet": "top1"}[name]
        assert 0 <= metrics[main_metric] <= 100 or name == "nocaps"


def test_global_and_per_submodel_budgets_differ_and_both_hit_the_target(pipelines, tmp_path):
    """BLIP-2 at 0.5: one budget lets the towers' sparsities differ; one budget per
    sub-model holds each at 0.5. Both prune exactly 0.5 of the prunable weights."""
    work = pipelines["blip2_opt"]
    common = ["--model", work / "model", "--device", "cpu", "--dtype", "float32", "--calibration", work / "calib.safetensors"]
    _run("score", *common, "--kind", "first_order", "--batch-size", 2, "--out", tmp_path / "fo.json")
    achieved = {}
    for scope in ("global", "submodel"):
        _run("allocate", "--layout", work / "layout.json", "--kind", "ecoflap", "--scores", tmp_path / "fo.json",
             "--target", 0.5, "--scope", scope, "--out", tmp_path / f"{scope}.json")
        alloc = json.loads((tmp_path / f"{scope}.json").read_text())
        assert alloc["planned_global_sparsity"] == pytest.approx(0.5, abs=1e-6)
        _run("prune", *common, "--allocation", tmp_path / f"{scope}.json", "--pruner", "wanda", "--batch-size", 2,
             "--out", tmp_path / f"{scope}_model", "--report", tmp_path / f"{scope}_pruning.json")
        achieved[scope] = json.loads((tmp_path / f"{scope}_pruning.json").read_text())
    planned = {}
    for scope, rep in achieved.items():
        alloc = json.loads((tmp_path / f"{scope}.json").read_text())
        planned[scope] = alloc["planned_submodel_sparsity"]
        by_sub, overall = _expected_by_submodel(work / "model", alloc["layer_sparsity"])
        assert rep["global_sparsity"] == pytest.approx(overall, abs=1e-9), scope
        assert rep["submodel_sparsity"] == pytest.approx(by_sub, abs=1e-9), scope
        assert abs(overall - 0.5) < 1 / 64, scope  # per-row rounding of 32-column layers
    assert set(planned["global"]) == {"vision", "qformer", "language"}
    assert all(v == pytest.approx(0.5, abs=1e-6) for v in planned["submodel"].values())
    assert max(abs(v - 0.5) for v in planned["global"].values()) > 0.01
    print("planned per-sub-model sparsity:", json.dumps(planned))
    print("achieved:", json.dumps({s: r["submodel_sparsity"] for s, r in achieved.items()}))


def test_only_chosen_submodels_are_pruned(pipelines, tmp_path):
    work = pipelines["blip2_t5"]
    _run("allocate", "--layout", work / "layout.json", "--kind", "uniform", "--target", 0.5,
         "--submodels", "vision", "language", "--out", tmp_path / "alloc.json")
    _run("prune", "--model", work / "model", "--device", "cpu", "--dtype", "float32", "--calibration",
         work / "calib.safetensors", "--allocation", tmp_path / "alloc.json", "--pruner", "wanda", "--batch-size", 2,
         "--out", tmp_path / "pruned", "--report", tmp_path / "pruning.json")
    from ecoflap.models.loading import load_model

    pruned, _ = load_model(tmp_path / "pruned", torch.device("cpu"), torch.float32)
    dense, _ = load_model(work / "model", torch.device("cpu"), torch.float32)
    assert torch.equal(pruned.qformer.encoder.layer[0].attention.attention.query.weight,
                       dense.qformer.encoder.layer[0].attention.attention.query.weight)
    w = pruned.language_model.decoder.block[1].layer[2].DenseReluDense.wo.weight
    assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)


def test_language_model_is_calibrated_on_the_pruned_vision_side(pipelines):
    """The language stack's captured inputs change once the vision tower is pruned."""
    from ecoflap.data.calibration import batches, load_calibration
    from ecoflap.models.base import model_layout
    from ecoflap.models.registry import adapter_for
    from ecoflap.models.loading import load_model
    from ecoflap.blocks.capture import capture_stack_inputs
    from ecoflap.pruning.engine import prune_sequential
    from ecoflap.pruning.methods import make_pruner

    work = pipelines["blip2_opt"]
    model, _ = load_model(work / "model", torch.device("cpu"), torch.float32)
    adapter = adapter_for(model)
    data = batches(load_calibration(work / "calib.safetensors"), 2)
    language = adapter.stacks(model)[-1]
    before = capture_stack_inputs(model, adapter, language, data, torch.device("cpu"))[0][0].hidden.clone()
    layout = {b: v for b, v in model_layout(model, adapter).items() if b.startswith("vision_model.")}
    per_layer = uniform_per_layer(layout, 0.5)
    prune_sequential(model, adapter, make_pruner("wanda"), per_layer, data, torch.device("cpu"))
    after = capture_stack_inputs(model, adapter, language, data, torch.device("cpu"))[0][0].hidden
    image_part = slice(0, model.config.num_query_tokens)
    assert not torch.allclose(before[:, image_part], after[:, image_part])
    assert torch.equal(before[:, image_part.stop:], after[:, image_part.stop:])  # text embeddings untouched


@pytest.mark.parametrize("kind", ["clip", "blip2_retrieval"])
def test_retrieval_embeddings_match_the_models_own_scores(pipelines, kind):
    """Our separately computed embeddings rank pairs exactly as the model's forward does."""
    from ecoflap.data.files import open_image
    from ecoflap.models.registry import adapter_for
    from ecoflap.models.loading import load_model

    model, procs = load_model(pipelines[kind] / "model", torch.device("cpu"), torch.float32)
    adapter = adapter_for(model)
    images = [open_image(p) for p in sorted((FIX / "flickr30k/flickr30k-images").glob("*.jpg"))[:3]]
    texts = ["a red ball", "a green box seen from above", "two blue circles"]
    ours = adapter.similarity(adapter.image_embeddings(model, procs, images), adapter.text_embeddings(model, procs, texts))
    batch = adapter.calibration_batch(model, procs, images, texts, "")
    with torch.no_grad():
        out = model(**batch) if kind == "clip" else model(**batch, use_image_text_matching_head=False)
    theirs = out.logits_per_image
    scale = (theirs / ours).mean()
    assert torch.allclose(ours * scale, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["blip2_t5", "instructblip", "clip"])
def test_checkpointed_scores_equal_full_backward_across_stacks(pipelines, kind):
    """The fast scorer's exact gradients flow from the language model back through the
    projection and the Q-Former into the vision tower: |w g| per block equals a full backward."""
    from ecoflap.data.calibration import batches, load_calibration
    from ecoflap.models.registry import adapter_for
    from ecoflap.models.loading import load_model
    from ecoflap.scoring.checkpointed import checkpointed_gradient_scores
    from ecoflap.scoring.first_order import first_order_scores

    model, _ = load_model(pipelines[kind] / "model", torch.device("cpu"), torch.float64)
    adapter = adapter_for(model)
    data = batches({k: v.double() if v.is_floating_point() else v
                    for k, v in load_calibration(pipelines[kind] / "calib.safetensors").items()}, 2)
    fast = checkpointed_gradient_scores(model, adapter, data, torch.device("cpu"), "block", "abs_wg")
    full = first_order_scores(model, adapter, data, torch.device("cpu"), "block", "abs_wg")
    assert fast == pytest.approx(full, rel=1e-9)
    assert all(v > 0 for v in fast.values())
    assert {b.split(".")[0] for b in fast} >= {"vision_model"}


def test_matching_head_scores_equal_the_models_own(pipelines):
    """The re-ranking score (the ITM head's "match" logit averaged over the queries, as LAVIS's
    compute_itm, from cached ViT states) is what Blip2ForImageTextRetrieval's own matching path
    gives for the same pairs."""
    from ecoflap.data.files import open_image
    from ecoflap.models.registry import adapter_for
    from ecoflap.models.loading import load_model

    model, procs = load_model(pipelines["blip2_retrieval"] / "model", torch.device("cpu"), torch.float32)
    adapter = adapter_for(model)
    images = [open_image(p) for p in sorted((FIX / "flickr30k/flickr30k-images").glob("*.jpg"))[:2]]
    texts = ["a red ball", "two blue circles on a white plate"]
    ours = adapter.match_logits(model, procs, adapter.vision_states(model, procs, images), texts)
    enc = procs.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = model(pixel_values=procs.pixels(images), input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                       use_image_text_matching_head=True).logits_per_image
    assert torch.allclose(ours, theirs[:, 1], atol=1e-5)


def test_padding_never_reaches_the_pruning_statistics(pipelines):
    """Changing only the token ids at padded positions must not change a single mask."""
    from ecoflap.data.calibration import batches, load_calibration
    from ecoflap.models.base import model_layout
    from ecoflap.models.registry import adapter_for
    from ecoflap.models.loading import load_model
    from ecoflap.pruning.engine import prune_sequential
    from ecoflap.pruning.methods import make_pruner

    data = load_calibration(pipelines["clip"] / "calib.safetensors")
    assert (data["attention_mask"] == 0).any()  # the fixture captions differ in length
    other = dict(data, input_ids=data["input_ids"].masked_fill(data["attention_mask"] == 0, 7))
    hashes = {}
    for pruner in ("wanda", "sparsegpt"):
        for name, calib in (("padded", data), ("other padding", other)):
            model, _ = load_model(pipelines["clip"] / "model", torch.device("cpu"), torch.float32)
            adapter = adapter_for(model)
            layout = model_layout(model, adapter)
            per_layer = uniform_per_layer(layout, 0.5)
            hashes[pruner, name] = prune_sequential(model, adapter, make_pruner(pruner), per_layer,
                                                    batches(calib, 2), torch.device("cpu")).mask_sha256
    for pruner in ("wanda", "sparsegpt"):
        assert hashes[pruner, "padded"] == hashes[pruner, "other padding"], pruner


def _tiny(kind, tmp_path, dtype=torch.float64):
    from ecoflap.models.loading import load_model
    from ecoflap.models.registry import adapter_for

    model, procs = load_model(vl_models.build(kind, tmp_path / kind), torch.device("cpu"), dtype)
    return model, procs, adapter_for(model)


def _fixture_images(n):
    from ecoflap.data.files import open_image

    return [open_image(p) for p in sorted((FIX / "cc3m/images").glob("*.jpg"))[:n]]


def test_blip2_retrieval_caption_padding_stays_out_of_the_qformer_statistics(tmp_path):
    """The Q-Former's second run reads the captions; its layers must see their real tokens only
    (the text run once handed all padded positions to Wanda's and SparseGPT's statistics)."""
    from ecoflap.blocks.walk import feed_layers, walk_stack

    model, procs, adapter = _tiny("blip2_retrieval", tmp_path)
    captions = ["a red ball", "a green box seen from above on a wooden table today", "two blue circles", "a cat"]
    batch = adapter.calibration_batch(model, procs, _fixture_images(4), captions, "")
    text = procs.tokenizer(captions, padding=True)
    real = sum(map(sum, text.attention_mask))
    assert real < len(captions) * len(text.input_ids[0])  # the captions are padded
    stack = next(s for s in adapter.stacks(model) if s.name == "qformer")
    rows = []
    for step in walk_stack(model, adapter, stack, [batch], torch.device("cpu"), None):
        if step.index == 0:  # the text FFN runs only on the caption (the queries have their own)
            feed_layers(step, {"text_ffn": step.block.intermediate.dense},
                        lambda _name, x: rows.append(x.reshape(-1, x.shape[-1]).shape[0]))
    assert rows == [real], ("padding of the Q-Former's text run reached the pruning statistics; Blip2RetrievalAdapter's "
                            "qformer Stack needs mask_key=TEXT_MASK and calibration_batch the caption mask")
    old_file = {k: v for k, v in batch.items() if k != "text_attention_mask"}  # a calibration file made before
    with pytest.raises(ValueError, match="calibration file predates it; delete results/<model>/calibration"):
        adapter.loss(model, old_file)


def test_blip2_retrieval_caption_width_never_equals_the_image_runs(tmp_path):
    """The caption mask is matched to layer inputs by shape: a caption as wide as the queries or
    the ViT's tokens would mask the image run's states; such a width gets one more padding column,
    which leaves the model's scores unchanged."""
    model, procs, adapter = _tiny("blip2_retrieval", tmp_path)
    vision = model.config.vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    words = "a b c d e f g h i j k l m n o p q r s t u v w x y z".split()
    caption = next(" ".join(words[:n]) for n in range(1, 27) if len(procs.tokenizer(" ".join(words[:n])).input_ids) == tokens)
    images = _fixture_images(2)
    batch = adapter.calibration_batch(model, procs, images, [caption, "a cat"], "")
    assert batch["text_attention_mask"].shape[1] == tokens + 1 and batch["input_ids"].shape[1] == tokens + 1
    enc = procs.tokenizer([caption, "a cat"], padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = model(pixel_values=batch["pixel_values"], input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                       use_image_text_matching_head=False).logits_per_image
        ours = model(**adapter.model_inputs(batch), use_image_text_matching_head=False).logits_per_image
    assert torch.allclose(ours, theirs, atol=1e-12)


def test_blip_vqa_answers_do_not_depend_on_the_other_questions_in_the_batch(tmp_path):
    """BLIP's answer decoder attends to every position of the question states, padding included;
    answering a padded batch made each answer's scores depend on its batch mates."""
    from unittest import mock

    model, procs, adapter = _tiny("blip_vqa", tmp_path)
    images = _fixture_images(3)
    questions = ["what is it?", "what colour is the box on the wooden table in this picture?", "how many?"]
    generate = model.generate

    def scores(imgs, qs):
        found = {}

        def spy(*args, input_ids=None, attention_mask=None, **kwargs):
            out = generate(*args, input_ids=input_ids, attention_mask=attention_mask, output_scores=True,
                           return_dict_in_generate=True, **kwargs)
            for row, mask, s in zip(input_ids, attention_mask, out.scores[0].log_softmax(-1)):
                found[tuple(row[mask.bool()].tolist())] = s
            return out.sequences

        with mock.patch.object(model, "generate", spy):
            adapter.generate(model, procs, imgs, qs, {"max_new_tokens": 2, "do_sample": False, "num_beams": 1})
        return [found[tuple(procs.tokenizer(q).input_ids)] for q in qs]

    together = scores(images, questions)
    for i, q in enumerate(questions):
        alone = scores([images[i]], [q])[0]
        assert torch.allclose(together[i], alone, atol=1e-10), (
            f"question {i}: its answer's scores changed with its batch mates by "
            f"{(together[i] - alone).abs().max().item():.2e}; BlipVqaAdapter.generate must answer questions "
            "of one token length together, without padding")


def test_blip2_opt_padding_stays_out_of_the_flattened_mlp_statistics(tmp_path):
    """OPT's decoder layer flattens its states to [batch * positions, features] before fc1 and
    fc2: their statistics once took every padded position (160 rows for 97 real tokens)."""
    from ecoflap.blocks.walk import feed_layers, walk_stack

    model, procs, adapter = _tiny("blip2_opt", tmp_path)
    captions = ["a red ball", "a green box seen from above on a wooden table today", "two blue circles", "a cat"]
    batch = adapter.calibration_batch(model, procs, _fixture_images(4), captions, "a photo of")
    real = int(batch["attention_mask"].sum())
    assert real < batch["attention_mask"].numel()  # the captions are padded
    stack = adapter.stacks(model)[-1]
    for step in walk_stack(model, adapter, stack, [batch], torch.device("cpu"), None):
        rows = {}
        feed_layers(step, adapter.prunable_layers(step.block),
                    lambda name, x: rows.__setitem__(name.split(".")[-1], x.reshape(-1, x.shape[-1]).shape[0]))
        assert set(rows.values()) == {real}, rows
        break
