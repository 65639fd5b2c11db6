"""Chat vision-language models (LLaVA-1.5 / -NeXT / -OneVision, Qwen2-VL / Qwen2.5-VL / Qwen3-VL,
Idefics3 / SmolVLM, Gemma 3, InternVL) on tiny random models built in code: the calibration loss is the model's own loss with
only the caption counted, VQA answers are what `generate` gives each example alone, per-example
packing round-trips, and every class is scored, allocated, pruned and evaluated through Snakemake."""
import json

import pandas as pd
import pytest
import torch
import yaml

import chat_vlm_models as C
from conftest import REPO, run_snakemake
from ecoflap.models.chat_vlm import SHORT_ANSWER, conversation

FIX = REPO / "tests" / "fixtures" / "vl"
CAPTIONS = ["a red house by a river", "two cats on a sofa", "a dog in the park", "the sea at night"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_vlm")
    return {kind: C.build(kind, root / kind) for kind in C.KINDS}


@pytest.fixture(scope="module")
def images():
    from ecoflap.data.files import open_image

    return [open_image(p) for p in sorted(FIX.rglob("*.jpg"))[:4]]


def _load(path):
    from ecoflap.models.loading import load_model
    from ecoflap.models.registry import adapter_for

    model, procs = load_model(path, torch.device("cpu"), torch.float32)
    return model, procs, adapter_for(model)


@pytest.mark.parametrize("kind", C.KINDS)
def test_calibration_loss_is_the_models_own_on_the_caption_tokens(kind, built, images):
    """The adapter's batch, loss and label mask against a direct processor call and forward: the
    loss counts exactly the caption's tokens and the end of the turn."""
    model, procs, adapter = _load(built[kind])
    assert adapter.family == C.FAMILY_OF[kind]
    batch = adapter.calibration_batch(model, procs, images, CAPTIONS, "Describe it.")
    proc = procs.multimodal
    texts = [proc.apply_chat_template(conversation("Describe it.", c), tokenize=False) for c in CAPTIONS]
    nested = [[im] for im in images] if adapter.nested_images else images
    enc = proc(images=nested, text=texts, padding=True, padding_side="right", return_tensors="pt")
    for i, caption in enumerate(CAPTIONS):
        counted = batch["labels"][i][batch["labels"][i] != -100]
        assert proc.tokenizer.decode(counted).strip() == f"{caption}</s>", kind
    with torch.no_grad():
        direct = model(**enc, labels=batch["labels"]).loss
        ours = adapter.loss(model, batch)
    assert torch.equal(enc["input_ids"], batch["input_ids"])
    assert torch.allclose(ours, direct, atol=1e-6), kind


@pytest.mark.parametrize("kind", C.KINDS)
def test_vqa_answers_are_generate_on_each_example_alone(kind, built, images):
    model, procs, adapter = _load(built[kind])
    questions = ["What is in the picture?", "What colour is it?", "Is it day?"]
    answers = adapter.generate(model, procs, images[:3], [adapter.vqa_prompt.format(q) for q in questions],
                               {"max_new_tokens": 4})
    proc = procs.multimodal
    for image, question, answer in zip(images, questions, answers):
        text = proc.apply_chat_template([{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": f"{question}\n{SHORT_ANSWER}"}]}],
            add_generation_prompt=True, tokenize=False)
        enc = proc(images=[[image]] if adapter.nested_images else [image], text=[text], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=proc.tokenizer.pad_token_id)
        alone = proc.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        assert answer == alone, (kind, question)


@pytest.mark.parametrize("kind", C.KINDS)
def test_a_template_that_renders_bos_gets_one_bos(kind, built, images):
    """Gemma 3's template renders {{ bos_token }} and its tokenizer adds BOS as well: calibration
    and generation encode one BOS, as the processor's own apply_chat_template(tokenize=True) does."""
    model, procs, adapter = _load(built[kind])
    proc = procs.multimodal
    C.render_and_add_bos(proc)
    bos = proc.tokenizer.bos_token_id
    assert proc.tokenizer("hi").input_ids[0] == bos
    batch = adapter.calibration_batch(model, procs, images[:2], CAPTIONS[:2], "Describe it.")
    reference = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": "Describe it."}]},
         {"role": "assistant", "content": [{"type": "text", "text": CAPTIONS[0]}]}],
        tokenize=True, return_dict=True, return_tensors="pt")["input_ids"][0]
    assert (batch["input_ids"] == bos).sum(1).tolist() == [1, 1] and batch["input_ids"][:, 0].tolist() == [bos, bos]
    assert torch.equal(batch["input_ids"][0][batch["attention_mask"][0] == 1], reference), kind
    seen = {}
    generate = model.generate

    def recording(**kwargs):  # what the adapter hands the model's generate
        seen["ids"] = kwargs["input_ids"]
        return generate(**kwargs)

    model.generate = recording
    adapter.generate(model, procs, images[:2], [adapter.vqa_prompt.format("What is it?")] * 2, {"max_new_tokens": 2})
    assert (seen["ids"] == bos).sum(1).tolist() == [1, 1], kind


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "internvl"])
def test_tensors_without_an_example_dimension_are_packed_per_example(kind, built, images):
    """Qwen-VL's patches and InternVL's tiles are stored per example and joined back unchanged, so
    a calibration batch of two is the first two examples' own pixels."""
    model, procs, adapter = _load(built[kind])
    batch = adapter.calibration_batch(model, procs, images, CAPTIONS, "")
    two = adapter.model_inputs({k: v[:2] for k, v in batch.items()})
    alone = adapter.calibration_batch(model, procs, images[:2], CAPTIONS[:2], "")
    assert torch.equal(two["pixel_values"], adapter.model_inputs(alone)["pixel_values"])
    with torch.no_grad():
        assert torch.allclose(adapter.loss(model, {k: v[:2] for k, v in batch.items()}),
                              adapter.loss(model, alone), atol=1e-5)


def test_qwen3_vl_deepstack_is_replayed_between_language_blocks(built, images):
    """Qwen3-VL adds vision features to the image positions after language layers 0 and 1, outside
    any layer. While the walk prunes the language blocks one by one, each block's input must be
    what the model, with the blocks pruned so far, hands it (a fresh capture); without the
    injection the walk would feed block 1 something else."""
    from ecoflap.blocks.capture import capture_stack_inputs, run_block
    from ecoflap.blocks.walk import walk_stack

    model, procs, adapter = _load(built["qwen3_vl"])
    batch = adapter.calibration_batch(model, procs, images, CAPTIONS, "")
    language = adapter.stacks(model)[1]
    blocks = adapter.stack_blocks(model, language)
    cpu = torch.device("cpu")

    def true_input(j: int) -> torch.Tensor:  # what the model hands block j, from a hook
        seen = []
        handle = blocks[j].register_forward_pre_hook(lambda _m, args, kwargs: seen.append(
            args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
        with torch.no_grad():
            adapter.forward(model, batch)
        handle.remove()
        return seen[0]

    assert language.injects_between_blocks
    dense = capture_stack_inputs(model, adapter, language, [batch], cpu)[0]
    image_positions = batch["input_ids"] == model.config.image_token_id
    for inp in dense[:2]:  # the injection sits on the image positions only
        assert inp.injection is not None and torch.equal(inp.injection.where, image_positions)
    assert dense[2].injection is None
    plain = run_block(blocks[0], dense[0])
    assert not torch.allclose(plain, true_input(1), atol=1e-3)  # the injection matters
    for step in walk_stack(model, adapter, language, [batch], cpu, desc=None):
        assert torch.allclose(step.inputs[0].hidden, true_input(step.index), atol=1e-5), step.name
        with torch.no_grad():  # prune: the block's MLP loses its smaller half
            for layer in adapter.prunable_layers(step.block).values():
                w = layer.weight
                w[w.abs() < w.abs().median()] = 0


def test_every_class_through_the_workflow(built, tmp_path):
    """Each class: calibration on CC3M-format pairs through its chat template, gradient scores,
    ECoFLaP + Wanda at 0.5 over both towers, and VQAv2 answers on the fixture questions, for the
    pruned and the dense model. (The language-only budget, the published setting, runs every
    class through the same CLI stages in one process: the next test.)"""
    config = {
        "models": {kind: {"source": "local", "path": str(path), "family": C.FAMILY_OF[kind]}
                   for kind, path in built.items()},
        "device": "cpu", "dtype": "float32", "threads": 1, "seed": 0, "sparsities": [0.5],
        "calibration": {"source": "cc3m", "pairs": str(FIX / "cc3m/pairs.tsv"), "image_root": str(FIX / "cc3m"),
                        "n_samples": 4},
        "scorers": {"fast": {"kind": "checkpointed", "granularity": "block", "reduce": "l2", "batch_size": 2}},
        "methods": {
            "dense": {"pruner": "none"},
            "ecoflap_fast_wanda": {"pruner": "wanda", "allocation": "ecoflap", "scorer": "fast"},
        },
        "pruning": {"batch_size": 2},
        "evaluation": {"vqav2": {"task": "vqa", "dataset": "vqav2",
                                 "questions": str(FIX / "vqav2/v2_OpenEnded_mscoco_val2014_questions.json"),
                                 "annotations": str(FIX / "vqav2/v2_mscoco_val2014_annotations.json"),
                                 "image_dir": str(FIX / "coco/val2014"), "max_new_tokens": 3, "batch_size": 2,
                                 "limit": 3}},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    out = run_snakemake(tmp_path, tmp_path / "c.yaml", "--cores", "2", timeout=1500)
    assert out.returncode == 0, out.stderr[-4000:]
    for kind in C.KINDS:
        table = pd.read_csv(tmp_path / f"results/{kind}/summary/summary.csv")
        assert set(table["method"]) == {"dense", "ecoflap_fast_wanda"}, kind
        assert table["vqav2 accuracy"].between(0, 100).all(), kind
        both = json.loads((tmp_path / f"results/{kind}/ecoflap_fast_wanda/0.5/pruning.json").read_text())
        assert abs(both["global_sparsity"] - 0.5) < 0.01 and both["submodel_sparsity"]["vision"] > 0, kind


def test_every_class_with_a_language_only_budget_keeps_its_vision_tower_dense(built, tmp_path):
    """`submodels: [language]` (the setting DSA and ATP publish): the CLI stages the workflow
    runs (download, calibrate, allocate, prune), in this process to spare ten classes three job
    start-ups each. Every vision weight comes out bit-identical; the language model at 0.5."""
    from ecoflap.cli import main

    calibration = {"source": "cc3m", "pairs": str(FIX / "cc3m/pairs.tsv"), "image_root": str(FIX / "cc3m"),
                   "n_samples": 4, "seq_len": 128, "max_txt_len": 32, "prompt": "", "protocol": "caption"}
    for kind, path in built.items():
        work = tmp_path / kind
        model, layout, calib = work / "model", work / "layout.json", work / "calibration.safetensors"
        main(["download", "--spec", json.dumps({"source": "local", "path": str(path), "family": C.FAMILY_OF[kind],
                                                "trust_remote_code": False}),
              "--out", str(model), "--layout", str(layout)])
        main(["calibrate", "--model", str(model), "--spec", json.dumps(calibration), "--seed", "0", "--out", str(calib)])
        main(["allocate", "--layout", str(layout), "--target", "0.5", "--out", str(work / "allocation.json"),
              "--spec", json.dumps({"allocation": "uniform", "scope": "global", "submodels": ["language"]})])
        main(["prune", "--model", str(model), "--calibration", str(calib), "--allocation", str(work / "allocation.json"),
              "--device", "cpu", "--dtype", "float32", "--seed", "0", "--family", C.FAMILY_OF[kind],
              "--spec", json.dumps({"pruner": "wanda", "batch_size": 2, "n_samples": 4}),
              "--out", str(work / "pruned"), "--report", str(work / "pruning.json")])
        report = json.loads((work / "pruning.json").read_text())
        assert report["submodel_sparsity"].get("vision", 0) == 0, kind
        assert abs(report["submodel_sparsity"]["language"] - 0.5) < 0.01, kind
        plan = json.loads(layout.read_text())
        weights = {tower: [f"{name}.weight" for block, layers in plan["layout"].items()
                           if plan["submodel_of_block"][block] == tower for name in layers]
                   for tower in ("vision", "language")}
        dense, pruned = (dict(_load(folder)[0].named_parameters()) for folder in (model, work / "pruned"))
        assert weights["vision"] and all(torch.equal(dense[n], pruned[n]) for n in weights["vision"]), kind
        assert all(not torch.equal(dense[n], pruned[n]) for n in weights["language"]), kind


def test_textvqa_reader_and_official_accuracy():
    """TextVQA's official rule (m4c_evaluator, as LLaVA scores it): EvalAI's processing of the
    prediction and of all 10 answers, then the mean over leaving each annotator out of
    min(1, matches / 3). Hand-worked on the fixture's questions."""
    from ecoflap.data.eval_sets import load_textvqa
    from ecoflap.evaluation.metrics import vqa_accuracy, vqa_scores

    items = load_textvqa(FIX / "textvqa/TextVQA_0.5.1_val.json", FIX / "textvqa/train_images")
    assert [it.question_id for it in items] == ["34602", "34603", "34604"] and all(p.image_path.is_file() for p in items)
    brand, sign, number = (it.answers for it in items)
    assert vqa_accuracy("Dakota", brand, "textvqa_m4c") == 1.0
    assert vqa_accuracy("nous les gosses", brand, "textvqa_m4c") == pytest.approx((7 + 3 * 2 / 3) / 10)
    assert vqa_accuracy("stop sign", sign, "textvqa_m4c") == pytest.approx(9 * (1 / 3) / 10)
    assert vqa_accuracy("The twelve.", number, "textvqa_m4c") == pytest.approx((3 * 2 / 3 + 7) / 10)
    assert vqa_accuracy("12", number, "textvqa_m4c") == 1.0
    scores = vqa_scores({"34602": "dakota", "34603": "stop sign", "34604": "12"},
                        {it.question_id: it.answers for it in items}, protocol="textvqa_m4c")
    assert scores["accuracy"] == pytest.approx(round(100 * (1 + 0.3 + 1) / 3, 2))
    with pytest.raises(ValueError, match="10 answers"):
        vqa_accuracy("x", ["x"] * 9, "textvqa_m4c")


def test_textvqa_through_a_chat_vlm(built):
    from ecoflap.data.files import open_image
    from ecoflap.evaluation.vision_language import evaluate_vision_language

    model, procs, adapter = _load(built["llava"])
    spec = {"task": "vqa", "dataset": "textvqa", "name": "textvqa", "questions": str(FIX / "textvqa/TextVQA_0.5.1_val.json"),
            "image_dir": str(FIX / "textvqa/train_images"), "max_new_tokens": 3, "batch_size": 2}
    metrics, preds = evaluate_vision_language(model, procs, adapter, spec)
    assert metrics["protocol"] == "textvqa_m4c" and metrics["n"] == 3 and 0 <= metrics["accuracy"] <= 100
    image = open_image(FIX / "textvqa/train_images/0054c91397f2fe05.jpg")
    alone = adapter.generate(model, procs, [image], [adapter.vqa_prompt.format("what does the sign say?")],
                             {"max_new_tokens": 3, "use_cache": True})
    assert preds["34603"] == alone[0]


@pytest.mark.parametrize("config", ["llava15_7b.yaml", "qwen25vl_7b.yaml"])
def test_hub_configs_plan_offline(config, tmp_path):
    out = run_snakemake(tmp_path, REPO / "config/hub" / config, "-n", "--cores", "1", timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "wanda_lm" in out.stdout and "textvqa" in out.stdout


def test_textvqa_with_ocr_tokens_asks_what_llava_asks(built):
    """LLaVA-1.5's TextVQA prompt: the question, the image's Rosetta OCR tokens when it has any,
    then the short-answer instruction (three lines; two without tokens)."""
    from ecoflap.evaluation.vision_language import evaluate_vision_language

    model, procs, adapter = _load(built["llava"])
    asked = []

    class Recording(type(adapter)):
        def generate(self, model, procs, images, prompts, gen_kwargs):
            asked.extend(prompts)
            return ["dakota"] * len(prompts)

    spec = {"task": "vqa", "dataset": "textvqa", "name": "textvqa", "questions": str(FIX / "textvqa/TextVQA_0.5.1_val.json"),
            "image_dir": str(FIX / "textvqa/train_images"),
            "ocr_tokens": str(FIX / "textvqa/TextVQA_Rosetta_OCR_v0.2_val.json"), "batch_size": 8}
    metrics, _ = evaluate_vision_language(model, procs, Recording(), spec)
    assert asked == [
        "what is the brand of this camera?\nReference OCR token: dakota, 12\n" + SHORT_ANSWER,
        "what does the sign say?\n" + SHORT_ANSWER,
        "what number is on the shirt?\nReference OCR token: dakota, 12\n" + SHORT_ANSWER]
    assert metrics["accuracy"] == pytest.approx(round(100 * 1 / 3, 2))


def test_native_resolution_calibration_images_are_bounded(built):
    """Qwen-VL stores every patch of a calibration image: a large photo is scaled down to the
    adapter's pixel budget first (its patches, not its aspect ratio, are bounded)."""
    from PIL import Image

    model, procs, adapter = _load(built["qwen2_5_vl"])
    large = Image.new("RGB", (1400, 700), (120, 30, 200))
    bounded = adapter._bounded([large])[0]
    assert bounded.width * bounded.height <= adapter.calibration_max_pixels and abs(bounded.width / bounded.height - 2) < 0.01
    batch = adapter.calibration_batch(model, procs, [large], ["a purple wall"], "")
    assert int(batch["pixel_values_rows"][0]) <= adapter.calibration_max_pixels // (7 * 7)


def test_a_caption_without_a_token_budget_is_not_cut_mid_sentence(built, images):
    """A captioning entry without max_new_tokens (the evaluation passes no prompt and no budget)
    gets the whole caption the model writes up to its EOS, not the short-answer budget of 10 new
    tokens, which cut "a man riding a wave on top of a surfboard." to "a man riding a wave"."""
    from transformers import LogitsProcessor, LogitsProcessorList

    model, procs, adapter = _load(built["llava"])
    tok = procs.multimodal.tokenizer
    caption = "a man riding a wave on top of a surfboard."
    target = tok(caption, add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert len(target) > 11

    class Writes(LogitsProcessor):  # the model writes `caption`, then EOS
        start = None

        def __call__(self, input_ids, scores):
            self.start = self.start or input_ids.shape[1]
            out = torch.full_like(scores, -1e9)
            out[:, target[min(input_ids.shape[1] - self.start, len(target) - 1)]] = 0
            return out

    generate = model.generate
    model.generate = lambda **kw: generate(**kw, logits_processor=LogitsProcessorList([Writes()]))
    assert adapter.generate(model, procs, images[:2], ["", ""], {"use_cache": True}) == [caption] * 2
    # a VQA prompt keeps the short-answer budget; an entry's own max_new_tokens wins
    assert adapter.generate(model, procs, images[:1], [adapter.vqa_prompt.format("What?")], {}) == ["a man riding a wave"]
    assert adapter.generate(model, procs, images[:1], [""], {"max_new_tokens": 2}) == ["a man"]


def test_a_captioning_entry_gives_a_chat_vlm_a_sentence_of_new_tokens(built, monkeypatch):
    """With or without a prompt of its own, a captioning entry without max_new_tokens asks a chat
    VLM for up to CAPTION_MAX_NEW_TOKENS (a prompt such as "a photo of" once fell back to the
    short answer's 10); an entry's own budget is passed as it is."""
    from ecoflap.evaluation.vision_language import evaluate_vision_language
    from ecoflap.models.chat_vlm import CAPTION_MAX_NEW_TOKENS

    from ecoflap.evaluation import metrics

    model, procs, adapter = _load(built["llava"])
    budgets = []
    monkeypatch.setattr(metrics, "caption_metrics", lambda preds, refs, **kw: {"n": len(preds)})  # not under test

    class Recording(type(adapter)):
        def generate(self, model, procs, images, prompts, gen_kwargs):
            budgets.append(gen_kwargs.get("max_new_tokens"))
            return ["a photo of a thing"] * len(prompts)

    spec = {"task": "caption", "dataset": "nocaps", "name": "nocaps", "spice": False, "batch_size": 8,
            "annotations": str(FIX / "nocaps/nocaps_val_4500_captions.json"),
            "image_dir": str(FIX / "nocaps/images")}
    for extra in ({}, {"prompt": "a photo of"}, {"prompt": "a photo of", "max_new_tokens": 30}):
        evaluate_vision_language(model, procs, Recording(), {**spec, **extra})
    assert set(budgets[:-1]) == {CAPTION_MAX_NEW_TOKENS} and budgets[-1] == 30


@pytest.mark.parametrize("split", [True, False])
def test_idefics3_vision_blocks_see_only_real_tiles(built, split):
    """Idefics3's vision stack has no padding mask, because its processor makes every tile a full
    square and the model drops the all-zero tiles that fill examples with fewer tiles. If a
    transformers release padded inside a tile, or kept the filling tiles, the padding would enter
    the vision statistics: this fails first."""
    from PIL import Image

    from ecoflap.blocks.walk import feed_layers, walk_stack

    model, procs, adapter = _load(built["idefics3"])
    procs.multimodal.image_processor.do_image_splitting = split
    gen = torch.Generator().manual_seed(0)
    sizes = [(20, 20), (64, 64), (100, 30), (30, 100), (200, 150), (7, 90)]  # one tile up to 2 x 2 and more
    images = [Image.fromarray((torch.rand(h, w, 3, generator=gen) * 255).byte().numpy()) for w, h in sizes]
    batch = adapter.calibration_batch(model, procs, images, CAPTIONS + CAPTIONS[:2], "")
    tiles, masks = batch["pixel_values"].flatten(0, 1), batch["pixel_attention_mask"].flatten(0, 1)
    real = ~(tiles == 0).flatten(1).all(1)
    assert masks[real].bool().all()  # no padded pixel inside a real tile
    assert (~real).any() == split  # with splitting, examples with fewer tiles are filled up
    vision = next(s for s in adapter.stacks(model) if s.name == "vision")
    step = next(iter(walk_stack(model, adapter, vision, [batch], torch.device("cpu"), desc=None)))
    rows = {}
    feed_layers(step, adapter.prunable_layers(step.block), lambda name, x: rows.setdefault(name, x.shape[0]))
    assert set(rows.values()) == {int(real.sum())}, (rows, int(real.sum()))
