"""Vision-language dataset loaders on tiny fixtures in the official formats (tests/fixtures/vl)."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from ecoflap.data.eval_sets import (RetrievalSet, VQAItem, load_coco_karpathy, load_flickr30k_retrieval, load_gqa,
                                    load_imagenet_val, load_nocaps, load_okvqa, load_vqav2)
from ecoflap.data.files import UnreadableImageError, open_image
from ecoflap.data.imagenet_classes import (IMAGENET_CLASSNAMES, IMAGENET_SIMPLE_TEMPLATES, IMAGENET_TEMPLATES,
                                           IMAGENET_WNIDS, WNID_TO_INDEX, class_prompts)
from ecoflap.data.pairs import ImageCaption, load_cc3m_pairs, load_coco_caption_pairs

FX = Path(__file__).resolve().parent / "fixtures" / "vl"
COCO_VAL = FX / "coco" / "val2014"


def copy_fixture(tmp_path: Path, *parts: str) -> Path:
    src = FX.joinpath(*parts)
    dst = tmp_path.joinpath(*parts)
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
    return dst


# ----------------------------------------------------------------------------- VQA


def test_vqav2_joins_questions_and_annotations_in_question_order():
    items = load_vqav2(FX / "vqav2" / "v2_OpenEnded_mscoco_val2014_questions.json",
                       FX / "vqav2" / "v2_mscoco_val2014_annotations.json", COCO_VAL)
    assert [it.question_id for it in items] == ["420000", "420001", "730000", "740002"]
    first = items[0]
    assert first.question == "What color is the ball?"
    assert first.image_path == COCO_VAL / "COCO_val2014_000000000042.jpg"
    assert len(first.answers) == 10 and first.answers.count("red") == 7
    assert items[3].answers.count("pyramid") == 1
    assert isinstance(first, VQAItem)


def test_vqav2_limit():
    items = load_vqav2(FX / "vqav2" / "v2_OpenEnded_mscoco_val2014_questions.json",
                       FX / "vqav2" / "v2_mscoco_val2014_annotations.json", COCO_VAL, limit=2)
    assert [it.question_id for it in items] == ["420000", "420001"]
    with pytest.raises(ValueError, match="limit"):
        load_vqav2(FX / "vqav2" / "v2_OpenEnded_mscoco_val2014_questions.json",
                   FX / "vqav2" / "v2_mscoco_val2014_annotations.json", COCO_VAL, limit=-1)


def test_okvqa():
    items = load_okvqa(FX / "okvqa" / "OpenEnded_mscoco_val2014_questions.json",
                       FX / "okvqa" / "mscoco_val2014_annotations.json", COCO_VAL)
    assert [(it.question_id, it.image_path.name) for it in items] == [
        ("1335", "COCO_val2014_000000000133.jpg"), ("735", "COCO_val2014_000000000073.jpg"),
        ("745", "COCO_val2014_000000000074.jpg")]
    assert items[0].answers.count("baseball") == 6 and len(items[0].answers) == 10
    assert len(load_okvqa(FX / "okvqa" / "OpenEnded_mscoco_val2014_questions.json",
                          FX / "okvqa" / "mscoco_val2014_annotations.json", COCO_VAL, limit=1)) == 1


def test_gqa():
    items = load_gqa(FX / "gqa" / "testdev_balanced_questions.json", FX / "gqa" / "images")
    assert [it.question_id for it in items] == ["201307251", "20515074", "201640614"]
    assert items[1].image_path == FX / "gqa" / "images" / "n235859.jpg"
    assert items[1].answers == ["blue"]
    assert [it.question_id for it in load_gqa(FX / "gqa" / "testdev_balanced_questions.json",
                                              FX / "gqa" / "images", limit=2)] == ["201307251", "20515074"]


class _PromptRecorder:
    """A generating adapter that answers "red" and keeps the prompts it was given."""

    vqa_prompt = "Question: {} Short answer:"

    def __init__(self, family):
        self.family, self.prompts = family, []

    def generate(self, model, procs, images, prompts, gen_kwargs):
        self.prompts += prompts
        return ["red"] * len(prompts)


@pytest.mark.parametrize("family, lavis", [("blip2", True), ("instructblip", True), ("blip_vqa", True),
                                           ("llava", False)])
def test_lavis_families_are_asked_the_question_as_lavis_processes_it(family, lavis):
    """LAVIS's VQAv2 / OK-VQA / GQA configs run each question through `blip_question` (lower case,
    . ! " ( ) * # : ; ~ deleted, "?" kept) before BLIP-2's prompt: the published numbers come from
    "Question: what color is the ball? Short answer:", not "... What color ...". Chat VLMs keep it raw."""
    from ecoflap.evaluation.vision_language import _vqa

    adapter = _PromptRecorder(family)
    spec = {"task": "vqa", "dataset": "vqav2", "questions": FX / "vqav2" / "v2_OpenEnded_mscoco_val2014_questions.json",
            "annotations": FX / "vqav2" / "v2_mscoco_val2014_annotations.json", "image_dir": COCO_VAL, "limit": 2}
    _vqa(None, None, adapter, spec)
    raw = ["What color is the ball?", "Is the ball round?"]
    expected = [q.lower() for q in raw] if lavis else raw
    assert adapter.prompts == [f"Question: {q} Short answer:" for q in expected]


def test_blip_pre_question_follows_lavis():
    from ecoflap.data.captions import blip_pre_question

    assert blip_pre_question('What is the "Man" (left) doing? ') == "what is the man left doing?"
    assert blip_pre_question("Is it 3.5 m: tall; yes~no!*#") == "is it 35 m tall yesno"
    assert blip_pre_question("  Leading spaces stay.") == "  leading spaces stay"
    assert blip_pre_question(" ".join(["w"] * 60)) == " ".join(["w"] * 50)


def test_vqa_missing_files_name_file_url_and_config_key(tmp_path):
    q = FX / "vqav2" / "v2_OpenEnded_mscoco_val2014_questions.json"
    a = FX / "vqav2" / "v2_mscoco_val2014_annotations.json"
    with pytest.raises(FileNotFoundError) as e:
        load_vqav2(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", a, COCO_VAL)
    msg = str(e.value)
    assert "v2_OpenEnded_mscoco_val2014_questions.json" in msg and "https://visualqa.org/download.html" in msg
    assert "evaluation.vqav2.questions" in msg and "VQAv2" in msg

    with pytest.raises(FileNotFoundError, match="evaluation.vqav2.annotations"):
        load_vqav2(q, tmp_path / "nope.json", COCO_VAL)
    with pytest.raises(FileNotFoundError, match="my.vqa.image_dir"):
        load_vqav2(q, a, tmp_path / "no_images", config_key="my.vqa")

    with pytest.raises(FileNotFoundError) as e:
        load_okvqa(tmp_path / "OpenEnded_mscoco_val2014_questions.json",
                   FX / "okvqa" / "mscoco_val2014_annotations.json", COCO_VAL)
    assert "okvqa.allenai.org" in str(e.value) and "OpenEnded_mscoco_val2014_questions.json" in str(e.value)

    with pytest.raises(FileNotFoundError) as e:
        load_gqa(tmp_path / "testdev_balanced_questions.json", FX / "gqa" / "images")
    assert "testdev_balanced_questions.json" in str(e.value)
    assert "https://cs.stanford.edu/people/dorarad/gqa/download.html" in str(e.value)


def test_missing_image_is_named(tmp_path):
    images = copy_fixture(tmp_path, "coco", "val2014")
    (images / "COCO_val2014_000000000073.jpg").unlink()
    q = FX / "vqav2" / "v2_OpenEnded_mscoco_val2014_questions.json"
    a = FX / "vqav2" / "v2_mscoco_val2014_annotations.json"
    assert len(load_vqav2(q, a, images, limit=2)) == 2  # only loaded items are checked
    with pytest.raises(FileNotFoundError) as e:
        load_vqav2(q, a, images)
    assert "COCO_val2014_000000000073.jpg" in str(e.value) and "cocodataset.org" in str(e.value)


def test_vqa_question_without_annotation(tmp_path):
    a = json.loads((FX / "vqav2" / "v2_mscoco_val2014_annotations.json").read_text())
    a["annotations"] = [x for x in a["annotations"] if x["question_id"] != 420001]
    (tmp_path / "ann.json").write_text(json.dumps(a))
    with pytest.raises(ValueError, match="420001"):
        load_vqav2(FX / "vqav2" / "v2_OpenEnded_mscoco_val2014_questions.json", tmp_path / "ann.json", COCO_VAL)


def test_wrong_format_is_reported(tmp_path):
    (tmp_path / "q.json").write_text(json.dumps({"not_questions": []}))
    with pytest.raises(ValueError, match="official format"):
        load_vqav2(tmp_path / "q.json", FX / "vqav2" / "v2_mscoco_val2014_annotations.json", COCO_VAL)


# ----------------------------------------------------------------------------- captions / retrieval


def test_coco_karpathy_test_split():
    items = load_coco_karpathy(FX / "karpathy" / "dataset_coco.json", FX / "coco")
    assert [it.image_id for it in items] == ["42", "73", "133"]
    assert items[0].image_path == FX / "coco" / "val2014" / "COCO_val2014_000000000042.jpg"
    assert items[0].references == ["A red ball on a plain background.", "A round red object."]
    assert len(items[1].references) == 3
    assert [it.image_id for it in load_coco_karpathy(FX / "karpathy" / "dataset_coco.json", FX / "coco",
                                                     split="train")] == ["9"]
    assert len(load_coco_karpathy(FX / "karpathy" / "dataset_coco.json", FX / "coco", limit=2)) == 2
    with pytest.raises(ValueError, match="restval|no images"):
        load_coco_karpathy(FX / "karpathy" / "dataset_coco.json", FX / "coco", split="restval")


def test_coco_karpathy_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_coco_karpathy(tmp_path / "dataset_coco.json", FX / "coco")
    msg = str(e.value)
    assert "dataset_coco.json" in msg and "https://cs.stanford.edu/people/karpathy/deepimagesent/" in msg
    assert "evaluation.coco_caption.karpathy_json" in msg


def test_nocaps():
    items = load_nocaps(FX / "nocaps" / "nocaps_val_4500_captions.json", FX / "nocaps" / "images")
    assert [it.image_id for it in items] == ["0", "1", "2"]
    assert [it.domain for it in items] == ["in-domain", "near-domain", "out-domain"]
    assert items[1].references == ["A square object.", "A block of colour.", "A red square on grey."]
    assert items[2].image_path.name == "0034cd4d3cd9cfc4.jpg"
    assert len(load_nocaps(FX / "nocaps" / "nocaps_val_4500_captions.json", FX / "nocaps" / "images",
                           limit=1)) == 1


def test_nocaps_missing(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_nocaps(tmp_path / "nocaps_val_4500_captions.json", FX / "nocaps" / "images")
    assert "nocaps_val_4500_captions.json" in str(e.value) and "https://nocaps.org/download" in str(e.value)


def test_flickr30k_retrieval():
    rs = load_flickr30k_retrieval(FX / "karpathy" / "dataset_flickr30k.json", FX / "flickr30k" / "flickr30k-images")
    assert isinstance(rs, RetrievalSet)
    assert [p.name for p in rs.image_paths] == ["1007129816.jpg", "1009434119.jpg", "101362133.jpg"]
    assert len(rs.texts) == 15 and rs.texts[5] == "A dog runs on grass."
    assert rs.img_of_text == [0] * 5 + [1] * 5 + [2] * 5
    assert rs.texts_of_image == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14]]
    for i, tids in enumerate(rs.texts_of_image):
        assert all(rs.img_of_text[t] == i for t in tids)
    small = load_flickr30k_retrieval(FX / "karpathy" / "dataset_flickr30k.json",
                                     FX / "flickr30k" / "flickr30k-images", limit=1)
    assert len(small.image_paths) == 1 and len(small.texts) == 5


def test_flickr30k_train_split_images_are_checked(tmp_path):
    # the train image is absent from the fixture: loading that split names it
    with pytest.raises(FileNotFoundError) as e:
        load_flickr30k_retrieval(FX / "karpathy" / "dataset_flickr30k.json",
                                 FX / "flickr30k" / "flickr30k-images", split="train")
    assert "1000092795.jpg" in str(e.value) and "evaluation.flickr30k.image_dir" in str(e.value)


# ----------------------------------------------------------------------------- ImageNet


def test_imagenet_class_metadata():
    assert len(IMAGENET_CLASSNAMES) == 1000 and len(IMAGENET_TEMPLATES) == 80
    assert IMAGENET_CLASSNAMES[:3] == ("tench", "goldfish", "great white shark")
    assert IMAGENET_CLASSNAMES[-1] == "toilet paper"
    assert IMAGENET_TEMPLATES[0] == "a bad photo of a {}." and IMAGENET_TEMPLATES[-1] == "a tattoo of the {}."
    assert len(set(IMAGENET_TEMPLATES)) == 80 and all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)
    assert set(IMAGENET_SIMPLE_TEMPLATES) <= set(IMAGENET_TEMPLATES) and len(IMAGENET_SIMPLE_TEMPLATES) == 7
    assert len(IMAGENET_WNIDS) == 1000 and len(set(IMAGENET_WNIDS)) == 1000
    assert list(IMAGENET_WNIDS) == sorted(IMAGENET_WNIDS)
    # spot checks of the wnid <-> CLIP name alignment
    for wnid, name in [("n01440764", "tench"), ("n01608432", "kite (bird of prey)"), ("n02012849", "crane bird"),
                       ("n03126707", "construction crane"), ("n03804744", "metal nail"),
                       ("n02114712", "red wolf or maned wolf"), ("n15075141", "toilet paper")]:
        assert IMAGENET_CLASSNAMES[WNID_TO_INDEX[wnid]] == name
    assert class_prompts("dog")[0] == "a bad photo of a dog."


def test_imagenet_val_subset():
    root = FX / "imagenet" / "val"
    items = load_imagenet_val(root, allow_subset=True)
    # interleaved by class: first image of each class, then the second ones
    assert [(it.image_path.parent.name, it.label) for it in items] == [
        ("n01440764", 0), ("n01443537", 1), ("n15075141", 999), ("n01440764", 0), ("n15075141", 999)]
    assert items[0].image_path.name == "ILSVRC2012_val_00000293.JPEG"
    assert [it.label for it in load_imagenet_val(root, limit=2, allow_subset=True)] == [0, 1]


def test_imagenet_val_requires_all_classes_unless_subset(tmp_path):
    with pytest.raises(ValueError, match="allow_subset"):
        load_imagenet_val(FX / "imagenet" / "val")
    with pytest.raises(FileNotFoundError) as e:
        load_imagenet_val(tmp_path / "val")
    assert "image-net.org" in str(e.value) and "evaluation.imagenet.val_dir" in str(e.value)
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="flat"):
        load_imagenet_val(tmp_path / "val", allow_subset=True)
    (tmp_path / "val" / "n99999999").mkdir()
    with pytest.raises(ValueError, match="n99999999"):
        load_imagenet_val(tmp_path / "val", allow_subset=True)


# ----------------------------------------------------------------------------- calibration pairs


@pytest.mark.parametrize("name", ["pairs.tsv", "pairs_noheader.tsv", "pairs.csv", "pairs.jsonl"])
def test_cc3m_local_lists(name):
    pairs = load_cc3m_pairs(FX / "cc3m" / name, FX / "cc3m", n=3, seed=0)
    assert len(pairs) == 3 and all(isinstance(p, ImageCaption) for p in pairs)
    assert all(p.image_path.parent == FX / "cc3m" / "images" and p.image_path.is_file() for p in pairs)
    expected = {f"{k:09d}.jpg": c for k, c in enumerate(
        ["a red ball on the floor", "a green box, seen from above", "a blue triangle sign",
         "an orange circle", "a purple square"])}
    assert all(expected[p.image_path.name] == p.caption for p in pairs)
    # image_root defaults to the list's folder
    assert load_cc3m_pairs(FX / "cc3m" / name, None, n=3, seed=0) == pairs


def test_cc3m_tsv_captions_keep_their_double_quotes(tmp_path):
    """CC3M's TSV has no quoting: a caption's '"' (balanced or not) is text, one line is one pair.
    A .csv keeps standard quoting, so a quoted caption may hold the delimiter."""
    for name in "abcd":
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.jpg")
    captions = ['"hello" said the sign on the door', '"best of 2010 movie poster', "a dog on the grass",
                'a cat called "tom" on a sofa']
    (tmp_path / "pairs.tsv").write_text("".join(f"{c}\t{n}.jpg\n" for c, n in zip(captions, "abcd")))
    pairs = load_cc3m_pairs(tmp_path / "pairs.tsv", n=4, seed=0, order="file")
    assert [(p.caption, p.image_path.name) for p in pairs] == [(c, f"{n}.jpg") for c, n in zip(captions, "abcd")]
    (tmp_path / "pairs.csv").write_text('caption,image\n"a ""big"" dog, asleep",a.jpg\n')
    assert load_cc3m_pairs(tmp_path / "pairs.csv", n=1, seed=0)[0].caption == 'a "big" dog, asleep'


def test_calibration_sampling_is_deterministic():
    a = load_cc3m_pairs(FX / "cc3m" / "pairs.tsv", FX / "cc3m", n=4, seed=7)
    b = load_cc3m_pairs(FX / "cc3m" / "pairs.tsv", FX / "cc3m", n=4, seed=7)
    assert a == b
    seeds = {tuple(p.image_path.name for p in load_cc3m_pairs(FX / "cc3m" / "pairs.tsv", FX / "cc3m",
                                                               n=4, seed=s)) for s in range(6)}
    assert len(seeds) > 1  # the seed matters
    # same formats, same seed -> same sample
    assert [p.image_path for p in load_cc3m_pairs(FX / "cc3m" / "pairs.jsonl", FX / "cc3m", n=4, seed=7)] == \
        [p.image_path for p in a]
    with pytest.raises(ValueError, match="holds 5"):
        load_cc3m_pairs(FX / "cc3m" / "pairs.tsv", FX / "cc3m", n=6, seed=0)


def test_cc3m_url_column_points_to_img2dataset():
    with pytest.raises(ValueError) as e:
        load_cc3m_pairs(FX / "cc3m" / "Train_GCC-training.tsv", None, n=1, seed=0)
    msg = str(e.value)
    assert "img2dataset" in msg and "URL" in msg and "Train_GCC-training.tsv" in msg


def test_cc3m_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_cc3m_pairs(tmp_path / "cc3m.tsv", None, n=1, seed=0)
    msg = str(e.value)
    assert "cc3m.tsv" in msg and "https://ai.google.com/research/ConceptualCaptions/download" in msg
    assert "img2dataset" in msg and "calibration.cc3m.path" in msg
    copy_fixture(tmp_path, "cc3m", "pairs.tsv")
    with pytest.raises(FileNotFoundError) as e:
        load_cc3m_pairs(tmp_path / "cc3m" / "pairs.tsv", None, n=2, seed=0)
    assert "images/0000000" in str(e.value) and "calibration.cc3m.image_root" in str(e.value)
    with pytest.raises(FileNotFoundError, match="no webdataset"):
        load_cc3m_pairs(tmp_path / "empty_dir_*.tar", None, n=1, seed=0, cache_dir=tmp_path / "c")


def test_webdataset_shards(tmp_path):
    cache = tmp_path / "cache"
    pairs = load_cc3m_pairs(FX / "cc3m" / "shards", None, n=5, seed=0, cache_dir=cache)
    # 5 complete samples over 2 shards (the json-only failed download is skipped)
    assert sorted(p.caption for p in pairs) == sorted(["a yellow star in the sky", "a small grey cat",
                                                       "a tall white lighthouse", "two black shoes", "a bowl of soup"])
    for p in pairs:
        assert p.image_path.is_file() and cache in p.image_path.parents
        assert open_image(p.image_path).size == (32, 32)
    with tarfile.open(FX / "cc3m" / "shards" / "00000.tar") as tar:
        star = tar.extractfile("000000000.jpg").read()
    assert next(p for p in pairs if p.caption == "a yellow star in the sky").image_path.read_bytes() == star

    again = load_cc3m_pairs(FX / "cc3m" / "shards", None, n=5, seed=0, cache_dir=cache)
    assert again == pairs
    two = load_cc3m_pairs(str(FX / "cc3m" / "shards" / "{00000..00001}.tar"), None, n=2, seed=3,
                          cache_dir=cache)
    assert two == load_cc3m_pairs(str(FX / "cc3m" / "shards" / "*.tar"), None, n=2, seed=3, cache_dir=cache)
    one = load_cc3m_pairs(FX / "cc3m" / "shards" / "00001.tar", None, n=2, seed=0, cache_dir=cache)
    assert sorted(p.caption for p in one) == ["a bowl of soup", "two black shoes"]
    with pytest.raises(ValueError, match="cache_dir"):
        load_cc3m_pairs(FX / "cc3m" / "shards", None, n=1, seed=0)


def test_webdataset_subdirectory_keys(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="PNG")
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for name, data in [("part/x01.png", buf.getvalue()), ("part/x01.txt", b" key in a folder \n"),
                           ("part/x02.txt", b"caption without image")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (pair,) = load_cc3m_pairs(tmp_path / "s.tar", None, n=1, seed=0, cache_dir=tmp_path / "c")
    assert pair.caption == "key in a folder" and pair.image_path.suffix == ".png"
    assert open_image(pair.image_path).getpixel((0, 0)) == (1, 2, 3)


def test_coco_caption_pairs():
    ann = FX / "coco" / "annotations" / "captions_train2017.json"
    img = FX / "coco" / "train2017"
    pairs = load_coco_caption_pairs(ann, img, n=4, seed=1)
    assert pairs == load_coco_caption_pairs(ann, img, n=4, seed=1)
    assert len(pairs) == 4 and all(p.image_path.parent == img for p in pairs)
    by_file = {"000000000009.jpg": {"A bowl of fruit.", "Food on a plate."},
               "000000000025.jpg": {"A giraffe eating leaves."},
               "000000000030.jpg": {"A vase of flowers.", "White flowers in a vase.", "A plant indoors."}}
    assert all(p.caption in by_file[p.image_path.name] for p in pairs)
    assert len(load_coco_caption_pairs(ann, img, n=6, seed=0)) == 6


def test_coco_caption_pairs_missing(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_coco_caption_pairs(tmp_path / "captions_train2017.json", FX / "coco" / "train2017", n=1, seed=0)
    assert "captions_train2017.json" in str(e.value) and "https://cocodataset.org" in str(e.value)
    assert "calibration.coco.captions" in str(e.value)


# ----------------------------------------------------------------------------- open_image


def test_open_image(tmp_path):
    im = open_image(COCO_VAL / "COCO_val2014_000000000042.jpg")
    assert im.mode == "RGB" and im.size == (32, 32)
    Image.new("L", (4, 4), 128).save(tmp_path / "grey.png")
    assert open_image(tmp_path / "grey.png").mode == "RGB"
    (tmp_path / "bad.jpg").write_bytes(b"not an image at all")
    with pytest.raises(UnreadableImageError, match="bad.jpg"):
        open_image(tmp_path / "bad.jpg")
    good = (COCO_VAL / "COCO_val2014_000000000042.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(good[: len(good) // 2])
    with pytest.raises(UnreadableImageError, match="truncated.jpg"):
        open_image(tmp_path / "truncated.jpg")
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        open_image(tmp_path / "missing.jpg")
