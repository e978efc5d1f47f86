"""Settings: one TOML file plus FEDLESION_SECTION__KEY overrides; every mistake names its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_gateway.settings import Destination
from fedlesion.settings import SettingsError, load_settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fedlesion.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_a_file() -> None:
    settings = load_settings(None, environ={})
    assert settings.node.ae_title == "FEDLESION"
    assert settings.node.web_host == "127.0.0.1"  # the web page binds to loopback unless configured
    assert settings.registry_dir == settings.storage.data_dir / "registry"


def test_file_values_and_environment_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, '[node]\nae_title = "STROKE_AI"\ndicom_port = 4242\n[storage]\ndata_dir = "/srv/fl"\n')
    settings = load_settings(path, environ={"FEDLESION_NODE__DICOM_PORT": "11113"})
    assert settings.node.ae_title == "STROKE_AI"
    assert settings.node.dicom_port == 11113  # the environment wins over the file
    assert settings.storage.data_dir == Path("/srv/fl")
    assert settings.registry_dir == Path("/srv/fl/registry")


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "[node]\nweb_port = 9000\n")
    assert load_settings(None, environ={"FEDLESION_CONFIG": str(path)}).node.web_port == 9000


@pytest.mark.parametrize(
    ("text", "environ", "named"),
    [
        ("[node]\ndicom_prot = 104\n", {}, "node.dicom_prot"),
        ("[nodes]\nae_title = 'X'\n", {}, "[nodes]"),
        ("[node]\ndicom_port = 70000\n", {}, "node.dicom_port"),
        ("[node]\ndicom_port = '104'\n", {}, "node.dicom_port"),
        ("[node]\nae_title = 'A_TITLE_FAR_TOO_LONG_FOR_DICOM'\n", {}, "node.ae_title"),
        ("[logging]\nlevel = 'LOUD'\n", {}, "logging.level"),
        ("", {"FEDLESION_NODE__WEB_PORT": "eighty"}, "node.web_port"),
        ("", {"FEDLESION_NODE__WEBPORT": "80"}, "node.webport"),
        ("", {"FEDLESION_NOPE__X": "1"}, "nope"),
    ],
)
def test_mistakes_stop_start_up_naming_the_key(tmp_path: Path, text: str, environ: dict, named: str) -> None:
    with pytest.raises(SettingsError, match=named.replace("[", r"\[").replace("]", r"\]")):
        load_settings(write(tmp_path, text), environ=environ)


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read settings file"):
        load_settings(tmp_path / "missing.toml", environ={})
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(write(tmp_path, "[node\n"), environ={})


def test_dicom_lists_come_from_toml_or_comma_separated_environment(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[dicom]\nallowed_calling_aes = ["PACS"]\ndestinations = ["PACS@10.0.0.5:104"]\n')
    settings = load_settings(config, environ={"FEDLESION_DICOM__COMPLETE_ON_RELEASE": "MODALITY1, PACS"})
    assert settings.dicom.allowed_calling_aes == ("PACS",)
    assert settings.dicom.complete_on_release == ("MODALITY1", "PACS")
    assert settings.dicom.parsed_destinations == (Destination("PACS", "10.0.0.5", 104),)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("FEDLESION_DICOM__DESTINATIONS", "PACS@host", "AE_TITLE@host:port"),
        ("FEDLESION_DICOM__DESTINATIONS", "PACS@host:99999", "AE_TITLE@host:port"),
        ("FEDLESION_DICOM__ALLOWED_CALLING_AES", "A\\\\B", "not a DICOM AE title"),
        ("FEDLESION_DICOM__MAX_ASSOCIATIONS", "0", "greater than 0"),
    ],
)
def test_bad_dicom_values_name_their_key(variable: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message) as error:
        load_settings(environ={variable: value})
    assert f"dicom.{variable.split('__')[1].lower()}" in str(error.value)
