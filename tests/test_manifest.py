"""Manifest validation: columns, splits, unique ids, stable label mapping."""

import pytest

from distlocal.data import ManifestError, read_manifest


def _write(tmp_path, text):
    path = tmp_path / "manifest.csv"
    path.write_text(text)
    return path


def test_class_names_map_in_sorted_order(tmp_path):
    """Named labels map to indices of their sorted names; relative paths resolve against the manifest."""
    m = read_manifest(_write(tmp_path, "slide_id,path,label,split\na,a.tif,LUSC,train\nb,b.tif,LUAD,valid\n"))
    assert m.classes == ["LUAD", "LUSC"]
    assert [r.label for r in m.records] == [1, 0]
    assert m.records[0].path == tmp_path / "a.tif"


def test_integer_labels_keep_their_value(tmp_path):
    """Integer labels are their own index, classes named by the integers."""
    m = read_manifest(_write(tmp_path, "slide_id,path,label,split\na,a.tif,2,train\nb,b.tif,0,test\n"))
    assert (m.classes, [r.label for r in m.records]) == (["0", "1", "2"], [2, 0])


def test_configured_classes_fix_the_order(tmp_path):
    """data.classes decides the order; a label outside it fails naming the slide."""
    path = _write(tmp_path, "slide_id,path,label,split\na,a.tif,LUSC,train\nb,b.tif,KIRC,train\n")
    with pytest.raises(ManifestError, match=r"slide 'b'.*'KIRC' is not one of the classes"):
        read_manifest(path, ["LUSC", "LUAD"])


def test_duplicate_slide_id_fails(tmp_path):
    """A repeated slide_id fails naming both lines."""
    path = _write(tmp_path, "slide_id,path,label,split\na,a.tif,x,train\na,b.tif,y,train\n")
    with pytest.raises(ManifestError, match=r"line 3.*duplicates line 2"):
        read_manifest(path)


def test_bad_split_fails(tmp_path):
    """A split outside train/valid/test fails naming the allowed values."""
    with pytest.raises(ManifestError, match="must be one of train, valid, test"):
        read_manifest(_write(tmp_path, "slide_id,path,label,split\na,a.tif,x,training\n"))


def test_missing_column_fails(tmp_path):
    """A manifest without the split column names the missing column and the header."""
    with pytest.raises(ManifestError, match=r"lacks column\(s\) \['split'\]"):
        read_manifest(_write(tmp_path, "slide_id,path,label\na,a.tif,x\n"))


def test_missing_manifest_file(tmp_path):
    """A manifest path that does not exist names the key to set."""
    with pytest.raises(ManifestError, match=r"data\.manifest"):
        read_manifest(tmp_path / "none.csv")
