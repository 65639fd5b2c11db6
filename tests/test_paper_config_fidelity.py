"""The paper configs keep the settings the authors' code runs with (ylsung/ECoFLaP at 59dac0a, and
locuslab/wanda 8e8fc87 / luuyin/OWL dddb7a4 for the LLaMA numbers printed beside ours). Each
assertion names the file and line of the authors' code it was read from (paths under LAVIS/ or
CoOp/ of ylsung/ECoFLaP unless said otherwise). A change to one of these values changes a number
we print beside a published one: change the test only together with the config's comment that
states the difference.

Also: a config whose zeroth-order scorer would run in bfloat16 is refused when validated (the
scorer refuses bfloat16 when its job runs, so flant5_mmlu.yaml's `dtype: bfloat16` failed its
ECoFLaP row after the download and calibration), and CLIP's calibration loss is computed in float32
from the model's logits, as the authors' CoOp/trainers/zsclip.py does from its fp16 logits."""
from __future__ import annotations

import copy

import pytest
import torch
import yaml

from conftest import REPO
from ecoflap.config import ConfigError, load_config, validate_config

PAPER = REPO / "config/paper"


def cfg(name):
    return load_config(PAPER / f"{name}.yaml")


@pytest.mark.parametrize("name, target", [("blip2_table1", 0.5), ("blip2_0.6", 0.6)])
def test_blip2_configs_keep_the_authors_settings(name, target):
    c = cfg(name)
    # wanda_pruner.py:276 int(cols x ratio) per row; sparsegpt_pruner.py:186-188 <= the int(n x s)-th smallest
    assert c["pruning"]["counts"] == "reference"
    # scripts/blip2/{wanda,sparsegpt,ecoflap_zeroth,ecoflap_first}.py:12-15 ratio 0.5 (keep ratio of the
    # prune spec); the 60 % figure has no script: the same with the keep ratio 0.4
    assert c["sparsities"] == [target]
    # evaluate_blip.py:144-146 --num_data 128 (both stages read the first batches of one loader)
    assert c["calibration"]["n_samples"] == 128 and c["pruning"]["n_samples"] == 128
    assert c["calibration"]["source"] == "cc3m" and c["calibration"]["protocol"] == "ecoflap"
    # lavis/models/blip2_models/blip2_t5.py:52 max_txt_len=32 (the pretrain_flant5xl config sets none)
    assert c["calibration"]["max_txt_len"] == 32
    zo, fo = c["scorers"]["zo"], c["scorers"]["fo"]
    # ecoflap_zeroth.py:11 block granularity, :13 MEZO-GradOnly_sum (one tensor at a time,
    # layer_single_base_pruner.py:512-549; block score = sum of its tensors' scores, :364-375)
    assert (zo["kind"], zo["granularity"], zo["perturb"]) == ("zeroth_order", "block", "tensor")
    assert zo["eps"] == 1e-3  # evaluate_blip.py:248-250 --noise_eps default
    assert zo["n_samples"] == 32  # evaluate_blip.py:240-242 --num_data_first_stage default
    assert zo["batch_size"] == 8  # ecoflap_zeroth.py:19 prunining_dataset_batch_size
    assert zo["reuse_block_inputs"] is False  # full forward passes (loss_vision_language, utils.py:21-31)
    # ecoflap_first.py:12 GradMagAbs_sum (|w| x mean |g|: layer_single_base_pruner.py:466-467), :28 128
    # samples, and no batch flag: evaluate_blip.py:274-278 default 1
    assert (fo["kind"], fo["granularity"], fo["reduce"]) == ("first_order", "block", "abs_wg")
    assert fo["n_samples"] == 128 and fo["batch_size"] == 1
    for method, scorer in (("ecoflap_zo_wanda", "zo"), ("ecoflap_fo_wanda", "fo")):
        m = c["methods"][method]
        assert (m["pruner"], m["allocation"], m["scorer"]) == ("wanda", "ecoflap", scorer)
        # ecoflap_zeroth.py:18 / ecoflap_first.py:17 max_sparsity_per_layer = 1 - keep + 0.1 = target + 0.1
        assert m["max_sparsity_offset"] == pytest.approx(0.1)
        assert m["aggregation"] == "sum"  # the "_sum" of the score methods
        # one budget over ViT and T5: --prune_per_model is off (evaluate_blip.py:258-261)
        assert m["scope"] == "global"
    for method in ("wanda", "sparsegpt", "ecoflap_zo_wanda", "ecoflap_fo_wanda"):
        # only visual_encoder...blocks and t5_model...block are pruned, the Q-Former never
        # (lavis/compression/pruners/wanda_pruner.py:731-737, 833-871)
        assert sorted(c["methods"][method]["submodels"]) == ["language", "vision"]
    # Wanda: one threshold per ViT matrix (wanda_pruner.py:553-556), per output row in T5 (:272-277)
    assert c["pruning"]["comparison"] == {"vision": "matrix"}
    # SparseGPT: percdamp 0.01, blocksize 128 (sparsegpt_pruner.py:394, 650)
    assert c["pruning"]["sparsegpt_damp"] == 0.01 and c["pruning"]["sparsegpt_block_size"] == 128
    assert c["pruning"]["sparsegpt_damping"] == "on_failure"  # sparsegpt_pruner.py:114-160, undamped first
    vqa = c["evaluation"]["vqav2"]
    # lavis/projects/blip2/eval/vqav2_zeroshot_flant5xl_eval.yaml:39-43 and blip2_t5.py:381 length_penalty -1
    assert (vqa["num_beams"], vqa["max_new_tokens"], vqa["length_penalty"]) == (5, 10, -1.0)
    assert vqa["prompt"] == "Question: {} Short answer:"
    assert vqa["min_new_tokens"] == 0  # min_length=1 (:40) counts T5's decoder start token


def test_blip2_table1_evaluations_keep_the_authors_settings():
    ev = cfg("blip2_table1")["evaluation"]
    for name in ("okvqa", "gqa"):  # okvqa_/gqa_zeroshot_flant5xl_eval.yaml:37-41 / 34-38
        e = ev[name]
        assert (e["num_beams"], e["max_new_tokens"], e["length_penalty"], e["prompt"]) == \
            (5, 10, -1.0, "Question: {} Short answer:")
    assert ev["okvqa"]["lemmatize"] is True  # okvqa_zeroshot_flant5xl_eval.yaml:14 apply_lemmatizer
    nocaps = ev["nocaps"]
    # nocaps_flant5xl_eval.yaml:32-34 max_len 30, min_len 8 (with the decoder start token), 5 beams;
    # configs/models/blip2/blip2_caption_flant5xl.yaml prompt "a photo of"; blip2_t5.py generate defaults
    assert (nocaps["num_beams"], nocaps["max_new_tokens"], nocaps["min_new_tokens"]) == (5, 30, 7)
    assert (nocaps["prompt"], nocaps["length_penalty"], nocaps["repetition_penalty"]) == ("a photo of", 1.0, 1.0)
    # ret_flickr_eval.yaml:29 test split, :39 k_test 128
    assert ev["flickr30k"]["split"] == "test" and ev["flickr30k"]["rerank_k"] == 128


def test_clip_config_keeps_the_authors_settings():
    c = cfg("clip_table")
    assert c["pruning"]["counts"] == "reference"  # CoOp wanda_pruner.py:379-381, sparsegpt_pruner.py:276-277
    assert c["pruning"]["sparsegpt_damping"] == "on_failure"  # CoOp sparsegpt_pruner.py:203-251
    # CoOp/scripts/coop/ecoflap_{wanda,sparsegpt}.sh:10 remaining_sparsity=0.6 is the keep ratio of
    # --*_prune_spec 1-0.6-1-1 (:27-28): 40 % sparsity; :11 max_sparsity_per_layer 0.5 = 0.4 + 0.1
    assert c["sparsities"] == [0.4]
    # CoOp/clip/model.py:430 build_model -> convert_weights (:371-392): fp16 weights, as loaded by
    # CoOp/trainers/coop.py:19-34 for ZeroshotCLIP (zsclip.py:39)
    assert c["dtype"] == "float16"
    assert c["calibration"]["n_samples"] == 128 and c["pruning"]["n_samples"] == 128  # train.py:116
    assert c["pruning"]["batch_size"] == 16  # zsclip.py:54 TRAIN_X.BATCH_SIZE = 16 for the pruning loader
    assert c["calibration"]["protocol"] == "coop"  # configs/trainers/CoOp/vit_b16.yaml:13 train transforms
    zo = c["scorers"]["zo"]
    assert (zo["kind"], zo["granularity"], zo["perturb"]) == ("zeroth_order", "block", "tensor")  # .sh:46-48
    assert (zo["n_samples"], zo["batch_size"], zo["eps"]) == (32, 16, 1e-3)  # train.py:123, zsclip.py:54, train.py:126
    for method in ("ecoflap_zo_wanda", "ecoflap_zo_sparsegpt"):
        m = c["methods"][method]
        assert m["max_sparsity_offset"] == pytest.approx(0.1) and m["aggregation"] == "sum"
        # CoOp/trainers/pruners/wanda_pruner.py:591-602: LayerSparsity without prune_per_model: one budget
        assert m["scope"] == "global"
    for method in ("wanda", "sparsegpt", "ecoflap_zo_wanda", "ecoflap_zo_sparsegpt"):
        assert not c["methods"][method].get("submodels")  # both towers (wanda_pruner.py:626-676)
    # Wanda sorts along each output row in both towers (CoOp/trainers/pruners/wanda_pruner.py:379-381)
    assert c["pruning"]["comparison"] == {}
    datasets = {"caltech101", "dtd", "eurosat", "fgvc_aircraft", "food101", "imagenet", "oxford_flowers",
                "oxford_pets", "stanford_cars", "sun397", "ucf101"}  # ecoflap_wanda.sh:15
    evaluated = set()
    for spec in c["models"].values():
        # zsclip.py:52-55: each data set's model is calibrated on its own train split
        assert spec["evaluate"] == [spec["calibration"]["dataset"]]
        evaluated.update(spec["evaluate"])
    assert evaluated == datasets
    # zsclip.py:13-29: one prompt per data set, "a photo of a {}." for ImageNet
    assert c["evaluation"]["imagenet"]["templates"] == "coop"


def test_eva_config_keeps_the_authors_settings():
    c = cfg("eva_vit_imagenet")
    assert c["sparsities"] == [0.5, 0.6]
    assert c["dtype"] == "float32"  # lavis/models/clip_models/eva_model.py:562 precision fp32
    # evaluate_eva_clip.py:141-143 --num_data 128, unshuffled "val" loader (exp_imnet_zs_eval.yaml:26)
    assert c["calibration"]["n_samples"] == 128 and c["calibration"]["protocol"] == "ecoflap"
    assert c["calibration"]["train_dir"] == "data/imagenet/val"
    zo = c["scorers"]["zo"]
    # scripts/eva_clip/ecoflap.py:11 block, :13 MEZO-GradOnly_sum, :19 batch 8; evaluate_eva_clip.py:219-229
    assert (zo["granularity"], zo["perturb"], zo["batch_size"], zo["n_samples"], zo["eps"]) == \
        ("block", "tensor", 8, 32, 1e-3)
    m = c["methods"]["ecoflap_zo_wanda"]
    assert m["max_sparsity_offset"] == pytest.approx(0.1) and m["aggregation"] == "sum"  # ecoflap.py:18
    # evaluate_eva_clip.py:414-423: the saved checkpoint drops blocks.39, evaluated over the dense model
    for method in ("wanda", "ecoflap_zo_wanda"):
        assert c["methods"][method]["dense_blocks"] == ["visual.trunk.blocks.39"]
    assert c["pruning"]["comparison"] == {"vision": "matrix"}  # wanda_pruner.py:553-556


def test_flant5_config_keeps_the_authors_settings():
    c = cfg("flant5_mmlu")
    assert c["pruning"]["counts"] == "reference"  # wanda_pruner.py:276 int(cols x ratio) per row
    assert c["sparsities"] == [0.5, 0.6]
    # a zeroth-order scorer in bfloat16 fails its job (scoring/zeroth_order.py); auto scores in float32
    assert c["dtype"] == "auto"
    # evaluate_t5.py:144-146 --num_data 128; lavis/models/t5_models/t5.py:32 max_txt_len 512;
    # lavis/datasets/datasets/c4_dataset.py:32-37 the validation shard, :60-63 the prefix/target split
    assert (c["calibration"]["source"], c["calibration"]["protocol"]) == ("c4", "ecoflap")
    assert c["calibration"]["n_samples"] == 128 and c["calibration"]["max_txt_len"] == 512
    zo = c["scorers"]["zo"]
    # scripts/t5/ecoflap.py:11 block, :13 MEZO-GradOnly_avg, :19 batch 8; evaluate_t5.py:224-234
    assert (zo["granularity"], zo["perturb"], zo["batch_size"], zo["n_samples"], zo["eps"]) == \
        ("block", "tensor", 8, 32, 1e-3)
    m = c["methods"]["ecoflap_zo_wanda"]
    assert m["aggregation"] == "avg" and m["max_sparsity_offset"] == pytest.approx(0.1)  # ecoflap.py:13, :18
    assert c["methods"]["wanda"]["allocation"] == "uniform"  # scripts/t5/wanda.py: no granularity
    # mmlu_eval/evaluate_flan.py:228 --ntrain 5
    assert c["evaluation"]["lm_eval"]["tasks"] == ["mmlu"] and c["evaluation"]["lm_eval"]["num_fewshot"] == 5


def test_llama_config_keeps_the_neighbours_protocol():
    c = cfg("llama7b_unstructured")
    assert c["pruning"]["counts"] == "reference"  # wanda lib/prune.py:199, lib/sparsegpt.py:85-86
    # locuslab/wanda main.py: fp16 model, --seed 0, --nsamples 128, seqlen 2048 (ylsung/ECoFLaP
    # LLaMA/main.py:19, 26, 32-33 is the same file)
    assert c["dtype"] == "float16" and c["seed"] == 0
    assert (c["calibration"]["source"], c["calibration"]["n_samples"], c["calibration"]["seq_len"]) == ("c4", 128, 2048)
    assert c["pruning"]["n_samples"] == 128
    # wanda lib/eval.py eval_ppl_wikitext: windows of model.seqlen 2048
    assert c["evaluation"]["perplexity"]["dataset"] == "wikitext2"
    assert c["evaluation"]["perplexity"]["seq_len"] == 2048
    # OWL README.md:106-107 --Lamda 0.08 --Hyper_m 5
    assert c["methods"]["owl_wanda"]["lambda"] == 0.08 and c["scorers"]["owl"]["m"] == 5
    # wanda lib/prune.py:288 percdamp 0.01, blocksize 128; lib/sparsegpt.py adds the damp always
    assert c["pruning"]["sparsegpt_damp"] == 0.01 and c["pruning"]["sparsegpt_block_size"] == 128
    assert c["pruning"]["sparsegpt_damping"] == "always"


def test_a_zeroth_order_scorer_in_bfloat16_is_refused_at_validation():
    raw = yaml.safe_load((PAPER / "flant5_mmlu.yaml").read_text())
    validate_config(raw)
    bad = copy.deepcopy(raw)
    bad["dtype"] = "bfloat16"
    with pytest.raises(ConfigError, match=r"config key dtype: bfloat16, but methods.ecoflap_zo_wanda scores with "
                                          r"scorers.zo, a zeroth_order scorer, which refuses bfloat16"):
        validate_config(bad)
    # float16 and scorers with exact gradients are fine in their dtypes
    validate_config({**raw, "dtype": "float16"})
    bf16_exact = copy.deepcopy(bad)
    bf16_exact["scorers"]["zo"] = {"kind": "checkpointed", "n_samples": 32, "batch_size": 8}
    validate_config(bf16_exact)


def test_clip_loss_is_computed_in_float32_from_the_logits(tmp_path):
    """CoOp/trainers/zsclip.py:86-89: cross-entropy of logits_per_image.float() and
    logits_per_text.float(), halved. transformers' return_loss computes it in the model's dtype,
    which in float16 rounds the loss (about 0.002 near 2) below a zeroth-order difference."""
    import torch.nn.functional as F
    from transformers import CLIPModel

    import vl_models
    from ecoflap.models.families.clip import ClipAdapter

    model = CLIPModel.from_pretrained(vl_models.build("clip", tmp_path / "clip")).eval()
    g = torch.Generator().manual_seed(0)
    size, vocab = model.config.vision_config.image_size, model.config.text_config.vocab_size
    batch = {"pixel_values": torch.randn(4, 3, size, size, generator=g),
             "input_ids": torch.randint(1, vocab - 1, (4, 7), generator=g),
             "attention_mask": torch.ones(4, 7, dtype=torch.long)}
    adapter = ClipAdapter()
    with torch.no_grad():
        assert torch.equal(adapter.loss(model, batch), model(**batch, return_loss=True).loss)  # float32: the same
        half = model.half()
        batch["pixel_values"] = batch["pixel_values"].half()
        out = half(**batch)
        theirs = (F.cross_entropy(out.logits_per_image.float(), torch.arange(4))
                  + F.cross_entropy(out.logits_per_text.float(), torch.arange(4))) / 2
        ours = adapter.loss(half, batch)
    assert ours.dtype == torch.float32
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)
