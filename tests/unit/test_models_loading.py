"""Loading refuses bad folders with one actionable ModelLoadError; ``crossdistill info`` lists and describes."""

from __future__ import annotations

import json
import shutil

import pytest

from crossdistill.cli import main
from crossdistill.errors import ModelLoadError
from crossdistill.models import family_names, get_family
from crossdistill.models.text import GenericTextEncoder


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd3")
    get_family("sd3").tiny(0).save_pretrained(path)
    return path


def test_transformer_folder_given_to_sd15_names_the_right_family(sd3_folder):
    with pytest.raises(ModelLoadError) as err:
        get_family("sd15").from_pretrained(sd3_folder)
    assert "holds an SD3Transformer2DModel (family sd3), not sd15: pass --family sd3" in str(err.value)


def test_missing_subfolder_says_what_is_expected(sd3_folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sd3_folder, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ModelLoadError, match=r"missing vae/ \(expected subfolders vae/, transformer/"):
        get_family("sd3").from_pretrained(broken)


def test_pickle_only_weights_are_refused_not_unpickled(sd3_folder, tmp_path):
    broken = tmp_path / "pickled"
    shutil.copytree(sd3_folder, broken)
    for f in (broken / "vae").glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(ModelLoadError, match=r"only pickle weights .* convert them to safetensors"):
        get_family("sd3").from_pretrained(broken)


def test_unknown_family_lists_the_choices():
    with pytest.raises(ModelLoadError, match="choose one of: flux, sd15, sd3, sdxl"):
        get_family("sd4")


def test_info_lists_families(capsys):
    assert main(["info"]) == 0
    assert capsys.readouterr().out.split() == family_names()


def test_info_describes_a_folder(sd3_folder, capsys):
    assert main(["info", "--family", "sd3", "--model", str(sd3_folder)]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["family"] == "sd3" and described["latent_channels"] == 16 and described["resolution"] == 16


def test_info_on_a_wrong_folder_is_one_clear_line(sd3_folder, capsys):
    assert main(["info", "--family", "flux", "--model", str(sd3_folder)]) == 2
    err = capsys.readouterr().err
    assert "pass --family sd3" in err and "Traceback" not in err


def test_info_reads_the_family_from_the_folder(sd3_folder, capsys):
    assert main(["info", "--model", str(sd3_folder)]) == 0
    assert json.loads(capsys.readouterr().out)["family"] == "sd3"


def test_generic_encoder_of_the_wrong_width_is_refused_at_load(tmp_path):
    get_family("sd15").tiny(0).save_pretrained(tmp_path)  # UNet built for a 32-wide CLIP
    minilm = GenericTextEncoder.minilm()  # 384 wide
    for sub, part in (("text_encoder", minilm.text_encoder), ("tokenizer", minilm.tokenizer)):
        shutil.rmtree(tmp_path / sub)
        part.save_pretrained(tmp_path / sub)
    with pytest.raises(ModelLoadError, match="text encoder is 384 wide but the UNet's cross_attention_dim is 32"):
        get_family("sd15").from_pretrained(tmp_path)
