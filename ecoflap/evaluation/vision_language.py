"""Zero-shot vision-language evaluation: VQA (VQAv2, OK-VQA, GQA), captioning (NoCaps,
COCO Karpathy), image-text retrieval (Flickr30k 1k) and zero-shot classification (ImageNet, the
CoOp data sets of the paper's CLIP table, Fashion-MNIST).
Datasets are read from their official annotation files (paths in config.yaml); the model
family's adapter says how to generate or embed; metrics live in `metrics.py`."""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ecoflap.catalog import DATASETS, default_protocol
from ecoflap.data import fashion_mnist as fm
from ecoflap.data.captions import blip_pre_question
from ecoflap.data.coop import COOP_DATASETS, load_coop_split
from ecoflap.data.eval_sets import (load_coco_karpathy, load_flickr30k_retrieval, load_gqa, load_imagenet_val,
                                    load_nocaps, load_okvqa, load_textvqa, load_textvqa_ocr, load_vqav2)
from ecoflap.data.files import open_image
from ecoflap.data.imagenet_classes import IMAGENET_CLASSNAMES, IMAGENET_SIMPLE_TEMPLATES, IMAGENET_TEMPLATES
from ecoflap.evaluation import metrics as M

log = logging.getLogger(__name__)

# Families whose published VQA numbers come from LAVIS, where every VQAv2 / OK-VQA / GQA question
# passes its `blip_question` processor (lower case, . ! " ( ) * # : ; ~ deleted) before the prompt
# is filled; FlanT5's tokenizer is case-sensitive, so a raw "What color ..." is another input.
LAVIS_QUESTION_FAMILIES = frozenset({"blip2", "instructblip", "blip_vqa"})


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _gen_kwargs(spec: dict[str, Any]) -> dict[str, Any]:
    keys = ("max_new_tokens", "min_new_tokens", "num_beams", "length_penalty", "repetition_penalty")
    # loading turns the KV cache off for calibration; generation wants it back
    return {"use_cache": True, **{k: spec[k] for k in keys if spec.get(k) is not None}}


def _key(spec: dict[str, Any]) -> str:
    return f"evaluation.{spec.get('name', spec['dataset'])}"


def _vqa(model, procs, adapter, spec) -> tuple[dict, dict]:
    ds, limit, key = spec["dataset"], spec.get("limit"), _key(spec)
    if ds == "gqa":
        items = load_gqa(spec["questions"], spec["image_dir"], limit, config_key=key)
    elif ds == "textvqa":
        items = load_textvqa(spec["questions"], spec["image_dir"], limit, config_key=key)
    else:
        load = load_vqav2 if ds == "vqav2" else load_okvqa
        items = load(spec["questions"], spec["annotations"], spec["image_dir"], limit, config_key=key)
    prompt = spec.get("prompt") or adapter.vqa_prompt  # the family's own zero-shot prompt
    lavis = getattr(adapter, "family", None) in LAVIS_QUESTION_FAMILIES
    questions = {it.question_id: blip_pre_question(it.question) if lavis else it.question for it in items}
    if ds == "textvqa" and spec.get("ocr_tokens"):
        # LLaVA-1.5's TextVQA prompt: the question, then the image's OCR tokens when it has any
        ocr = load_textvqa_ocr(spec["ocr_tokens"], key)
        for it in items:
            tokens = ocr.get(it.image_path.stem, [])
            if tokens:
                questions[it.question_id] = f"{questions[it.question_id]}\nReference OCR token: {', '.join(tokens)}"
    raw = {}
    for chunk in tqdm(list(_chunks(items, spec.get("batch_size", 8))), desc=f"{ds} answers", unit="batch"):
        images = [open_image(it.image_path) for it in chunk]
        answers = adapter.generate(model, procs, images, [prompt.format(questions[it.question_id]) for it in chunk],
                                   _gen_kwargs(spec))
        raw.update({it.question_id: a for it, a in zip(chunk, answers)})
    # BLIP-2's OK-VQA evaluation lemmatises its answers (LAVIS apply_lemmatizer) before scoring
    preds = M.lemmatize_answers(raw) if spec.get("lemmatize") else raw
    scores = M.vqa_scores(preds, {it.question_id: it.answers for it in items}, protocol=vqa_protocol(spec))
    scores["lemmatized"] = bool(spec.get("lemmatize"))
    return scores, preds


def vqa_protocol(spec: dict[str, Any]) -> str:
    """The accuracy protocol of a VQA entry: its `protocol`, else the one behind the dataset's
    published numbers (LAVIS's copy of vqaEval.py for VQAv2 / OK-VQA, LAVIS's GQA rule for GQA)."""
    return spec.get("protocol") or default_protocol(spec["dataset"])


def _caption(model, procs, adapter, spec) -> tuple[dict, dict]:
    ds, limit, key = spec["dataset"], spec.get("limit"), _key(spec)
    if ds == "nocaps":
        items = load_nocaps(spec["annotations"], spec["image_dir"], limit, config_key=key)
    else:
        items = load_coco_karpathy(spec["karpathy_json"], spec["image_root"], spec.get("split", "test"), limit,
                                   config_key=key)
    prompt = spec.get("prompt") or ""
    gen_kwargs = _gen_kwargs(spec)
    if "max_new_tokens" not in gen_kwargs and adapter.caption_max_new_tokens:  # a whole sentence, not a short answer
        gen_kwargs["max_new_tokens"] = adapter.caption_max_new_tokens
    preds = {}
    for chunk in tqdm(list(_chunks(items, spec.get("batch_size", 8))), desc=f"{ds} captions", unit="batch"):
        images = [open_image(it.image_path) for it in chunk]
        caps = adapter.generate(model, procs, images, [prompt] * len(chunk), gen_kwargs)
        preds.update({it.image_id: c for it, c in zip(chunk, caps)})
    refs = {it.image_id: it.references for it in items}
    scores = M.caption_metrics(preds, refs, spice=spec.get("spice", True))
    domains = sorted({it.domain for it in items if it.domain})
    for domain in domains:  # NoCaps reports in-, near- and out-domain beside the overall figures
        ids = [it.image_id for it in items if it.domain == domain]
        # each domain is scored on its own images (CIDEr's document frequencies from that subset)
        sub = M.caption_metrics({i: preds[i] for i in ids}, {i: refs[i] for i in ids},
                                spice=spec.get("spice", True), meteor=False)
        scores.update({f"{domain} {k}": v for k, v in sub.items() if k in ("CIDEr", "SPICE", "n")})
    return scores, preds


@torch.no_grad()
def _embed(fn, model, procs, things: list, batch_size: int, desc: str) -> torch.Tensor:
    return torch.cat([fn(model, procs, chunk).cpu() for chunk in
                      tqdm(list(_chunks(things, batch_size)), desc=desc, unit="batch")])


def _retrieval(model, procs, adapter, spec) -> tuple[dict, dict]:
    data = load_flickr30k_retrieval(spec["karpathy_json"], spec["image_dir"], spec.get("split", "test"),
                                    spec.get("limit"), config_key=_key(spec))
    bs = spec.get("batch_size", 8)
    images = _embed(lambda m, p, paths: adapter.image_embeddings(m, p, [open_image(x) for x in paths]),
                    model, procs, data.image_paths, bs, "image embeddings")
    texts = _embed(adapter.text_embeddings, model, procs, data.texts, bs, "text embeddings")
    sim = adapter.similarity(images, texts)
    k = spec.get("rerank_k", 128)
    if not k or not adapter.capabilities.reranks:
        return M.retrieval_recall(sim, data.img_of_text, data.texts_of_image), {}
    # BLIP-2's protocol: re-rank each query's top k by the matching head (score = ITM + ITC)
    i2t, t2i = _rerank(model, procs, adapter, data, sim, min(k, sim.shape[1]), min(k, sim.shape[0]), bs)
    tr = M.retrieval_recall(i2t, data.img_of_text, data.texts_of_image)
    ir = M.retrieval_recall(t2i, data.img_of_text, data.texts_of_image)
    out = {key: v for key, v in tr.items() if key.startswith("TR")} | {key: v for key, v in ir.items() if key.startswith("IR")}
    out["mean"] = sum(v for key, v in out.items() if "@" in key) / sum("@" in key for key in out)
    out["rerank_k"] = k
    return out, {}


@torch.no_grad()
def _rerank(model, procs, adapter, data, sim: torch.Tensor, k_text: int, k_image: int, bs: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    vision = torch.cat([adapter.vision_states(model, procs, [open_image(p) for p in chunk]).cpu()
                        for chunk in tqdm(list(_chunks(data.image_paths, bs)), desc="vision states", unit="batch")])
    i2t = torch.full_like(sim, -1e4)
    t2i = torch.full_like(sim, -1e4)
    for i in tqdm(range(sim.shape[0]), desc="re-rank texts per image", unit="image"):
        top = sim[i].topk(k_text).indices.tolist()
        for chunk in _chunks(top, bs):
            v = vision[i:i + 1].expand(len(chunk), -1, -1).to(model.device)
            score = adapter.match_logits(model, procs, v, [data.texts[t] for t in chunk]).cpu()
            i2t[i, chunk] = score + sim[i, chunk]
    for t in tqdm(range(sim.shape[1]), desc="re-rank images per text", unit="text"):
        top = sim[:, t].topk(k_image).indices.tolist()
        for chunk in _chunks(top, bs):
            score = adapter.match_logits(model, procs, vision[chunk].to(model.device), [data.texts[t]] * len(chunk)).cpu()
            t2i[chunk, t] = score + sim[chunk, t]
    return i2t, t2i


def _classification_set(spec) -> tuple[list, list[int], tuple[str, ...], tuple[str, ...]]:
    """(image loaders, labels, class names, prompt templates) of a classification dataset."""
    if spec["dataset"] == "fashion_mnist":  # vendored test subset, in memory
        images, labels = fm.load_split("test")
        n = spec.get("limit") or len(labels)
        return [lambda a=a: fm.to_image(a) for a in images[:n]], [int(y) for y in labels[:n]], fm.CLASSES, fm.TEMPLATES
    # the prompt CoOp's zero-shot CLIP uses (the paper's CLIP table); ImageNet defaults to CLIP's ensemble
    coop_prompt = (COOP_DATASETS[spec["dataset"]].template,)
    if spec["dataset"] != "imagenet":
        if spec.get("templates", "coop") != "coop":
            raise ValueError(f"{spec['dataset']}: the only prompt it has is CoOp's (templates: coop)")
        split = load_coop_split(spec["root"], spec["dataset"], spec.get("split", "test"), _key(spec))
        order = _by_class(split.labels, spec.get("limit"))
        return ([lambda p=split.image_paths[i]: open_image(p) for i in order], [split.labels[i] for i in order],
                split.classnames, coop_prompt)
    items = load_imagenet_val(spec["val_dir"], spec.get("limit"), allow_subset=spec.get("limit") is not None,
                              config_key=_key(spec))
    templates = {"ensemble": IMAGENET_TEMPLATES, "simple": IMAGENET_SIMPLE_TEMPLATES,
                 "coop": coop_prompt}[spec.get("templates") or "ensemble"]
    return ([lambda p=i.image_path: open_image(p) for i in items], [i.label for i in items],
            tuple(IMAGENET_CLASSNAMES), tuple(templates))


def _by_class(labels: list[int], limit: int | None) -> list[int]:
    """Item indices, all of them in file order, or with a `limit` the first of every class, then
    the second of every class, ... (so a small limit still spans the classes)."""
    if limit is None:
        return list(range(len(labels)))
    per_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        per_class.setdefault(y, []).append(i)
    queues = [per_class[y] for y in sorted(per_class)]
    order = [q[j] for j in range(max(map(len, queues))) for q in queues if j < len(q)]
    return order[:limit]


def _classification(model, procs, adapter, spec) -> tuple[dict, dict]:
    loaders, labels, classnames, templates = _classification_set(spec)
    if adapter.capabilities.labelled_images:  # a classifier: its own head's logits
        own = tuple(getattr(model.config, "templates", ()) or ())  # EVA-CLIP's zero-shot head: its own prompts
        if spec.get("templates") and tuple(templates) != own:
            raise ValueError(f"evaluation.{spec.get('name', spec['dataset'])}.templates: {adapter.family} classifies "
                             f"with its own head{' and its own ' + str(len(own)) + ' prompts' if own else ''}, so "
                             f"templates: {spec['templates']} would not apply; remove it"
                             + (" (or set ensemble, CLIP's 80, which it uses)" if own == tuple(IMAGENET_TEMPLATES)
                                else ""))
        n_classes = model.config.num_labels
        if n_classes != len(classnames):
            raise ValueError(f"this classifier predicts {n_classes} classes and {spec['dataset']} has "
                             f"{len(classnames)}; evaluate it on the data set its head was trained for")
        logits = _embed(lambda m, p, chunk: adapter.classify(m, p, [load() for load in chunk]),
                        model, procs, loaders, spec.get("batch_size", 8), "classifier logits")
        return M.topk_accuracy(logits, torch.tensor(labels)), {}
    classes = []
    for name in tqdm(classnames, desc="class embeddings (prompt ensemble)", unit="class"):
        emb = adapter.text_embeddings(model, procs, [t.format(name) for t in templates]).mean(0)
        classes.append(torch.nn.functional.normalize(emb, dim=-1).cpu())
    images = _embed(lambda m, p, chunk: adapter.image_embeddings(m, p, [load() for load in chunk]),
                    model, procs, loaders, spec.get("batch_size", 8), "image embeddings")
    logits = images @ torch.stack(classes).t()
    return M.topk_accuracy(logits, torch.tensor(labels)), {}


RUNNERS = {"vqa": _vqa, "caption": _caption, "retrieval": _retrieval, "classification": _classification}


def evaluate_vision_language(model: nn.Module, procs: Any, adapter: Any, spec: dict[str, Any]
                             ) -> tuple[dict[str, Any], dict[str, str]]:
    """Metrics and per-item predictions of one evaluation entry of config.yaml."""
    task = spec["task"]
    if task not in adapter.tasks:
        raise ValueError(f"{adapter.family} cannot be evaluated on {task} (it supports {adapter.tasks}); "
                         "remove this evaluation from the model's `evaluate:` list")
    if spec["dataset"] not in DATASETS or DATASETS[spec["dataset"]].task != task:
        raise ValueError(f"dataset {spec['dataset']!r} is not a {task} dataset")
    log.info("%s on %s (limit %s)", task, spec["dataset"], spec.get("limit"))
    metrics, preds = RUNNERS[task](model, procs, adapter, spec)
    metrics["dataset"] = spec["dataset"]
    return metrics, {str(k): v for k, v in preds.items()}
