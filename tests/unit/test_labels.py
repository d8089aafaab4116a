import pytest

from pipeline.errors import UserError
from pipeline.labels import apply_template, build_label_set, check_language, read_label_file, split_label_list


def test_template_applies_to_every_source(tmp_path):
    listed = build_label_set("x", "cat, dog", None, "a photo of a _.")
    assert listed.prompts() == ["a photo of a cat.", "a photo of a dog."]
    f = tmp_path / "labels.txt"
    f.write_text("cat\ndog\n", encoding="utf-8")
    assert build_label_set("x", None, str(f), "a photo of a _.").prompts() == listed.prompts()
    assert build_label_set("x", ["red circle"], None, "_").prompts() == ["red circle"]
    assert apply_template("一张_的照片。", "红色") == "一张红色的照片。"


@pytest.mark.parametrize("template", ["a photo", "a _ of a _.", ""])
def test_template_needs_exactly_one_placeholder(template):
    with pytest.raises(UserError, match="exactly one"):
        build_label_set("x", "cat", None, template)


def test_label_file_rules(tmp_path):
    f = tmp_path / "l.txt"
    f.write_bytes("\ufeff# animals\ncat\n\n  dog  \n#bird\n红色\n".encode("utf-8"))
    assert read_label_file(f) == ["cat", "dog", "红色"]
    f.write_bytes("cat\n\xe9t\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8 \\(line 2\\)"):
        read_label_file(f)
    with pytest.raises(UserError, match="not found"):
        read_label_file(tmp_path / "missing.txt")


def test_bad_label_sets():
    with pytest.raises(UserError, match="no labels"):
        build_label_set("x", "", None, "_")
    with pytest.raises(UserError, match=r"repeats labels \['cat'\]"):
        build_label_set("x", "cat,dog,cat", None, "_")
    with pytest.raises(UserError, match="give one label source"):
        build_label_set("x", "cat", "f.txt", "_")
    assert split_label_list("红色，绿色, blue") == ["红色", "绿色", "blue"]


def test_chinese_labels_refused_by_english_clip():
    zh = build_label_set("x", "红色,blue", None, "a photo of a _.")
    with pytest.raises(UserError, match="English-only.*红色"):
        check_language(zh, takes_chinese=False, model_path="m")
    check_language(zh, takes_chinese=True, model_path="m")
    with pytest.raises(UserError, match="template"):
        check_language(build_label_set("x", "red", None, "一张_的照片。"), takes_chinese=False, model_path="m")


def test_display_names_and_template_ensembles():
    labels = build_label_set("birds", [{"name": "crane (bird)", "prompt": "crane"}, "heron"], None, "_",
                             ["a photo of a _.", "a drawing of a _."])
    assert labels.labels == ("crane (bird)", "heron") and labels.texts == ("crane", "heron")
    assert labels.prompts("a drawing of a _.") == ["a drawing of a crane.", "a drawing of a heron."]
    with pytest.raises(UserError, match="exactly one"):
        build_label_set("x", "a", None, "_", ["ok _", "bad"])
    with pytest.raises(UserError, match="must be a string or"):
        build_label_set("x", [{"prompt": "no name"}], None, "_")
