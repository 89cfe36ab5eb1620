"""Configuration: embedded defaults, and errors that name the file, the key and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance import config
from tests.conftest import run_cli


def test_embedded_defaults_need_no_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(config.CONFIG_ENV, raising=False)
    monkeypatch.setattr(config, "SYSTEM_CONFIG", tmp_path / "absent.toml")
    monkeypatch.chdir(tmp_path)
    settings = config.load()
    assert settings.node.ae_title == "GATEWAY"
    assert settings.node.dicom_port == 11112
    assert settings.node.data_dir == tmp_path / "var"
    assert settings.node.allowed_callers == ()
    assert settings.source == "embedded defaults"


def test_contract_keys_are_read(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text(
        '[node]\nae_title = "CLINIC_GW"\ndicom_port = 4006\ndata_dir = "/srv/gw"\n'
        'allowed_callers = ["CR01", "CT_ROOM2"]\n'
    )
    settings = config.load(path)
    assert settings.node.ae_title == "CLINIC_GW"
    assert settings.node.dicom_port == 4006
    assert settings.node.data_dir == Path("/srv/gw")
    assert settings.node.allowed_callers == ("CR01", "CT_ROOM2")


def test_the_image_configuration_is_found_without_flags(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    system = tmp_path / "appliance.toml"
    system.write_text("[node]\ndicom_port = 104\n")
    monkeypatch.delenv(config.CONFIG_ENV, raising=False)
    monkeypatch.setattr(config, "SYSTEM_CONFIG", system)
    assert config.load().node.dicom_port == 104
    assert config.load().source == str(system)


def test_environment_variable_names_the_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "env.toml"
    path.write_text("[node]\ndicom_port = 4242\n")
    monkeypatch.setenv(config.CONFIG_ENV, str(path))
    assert config.load().node.dicom_port == 4242


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[node]\ndicom_prot = 104\n", ["unknown key 'dicom_prot'", "allowed keys", "dicom_port"]),
        ("[node]\ndicom_port = \"104\"\n", ["dicom_port", "wrong type", "an integer"]),
        ("[node]\ndicom_port = 70000\n", ["dicom_port = 70000", "1 to 65535"]),
        ("[node]\nae_title = \"A_VERY_LONG_AE_TITLE_X\"\n", ["ae_title", "at most 16 characters"]),
        ("[node]\nallowed_callers = \"CR01\"\n", ["allowed_callers", "a list of strings"]),
        ("[node]\nallowed_callers = [\"OK\", \"\"]\n", ["allowed_callers", "must not be empty"]),
        ("[nodes]\nae_title = \"X\"\n", ["unknown section [nodes]", "[node]"]),
        ("[node\nae_title = 1\n", ["not valid TOML"]),
        ("[node]\nlog_level = \"LOUD\"\n", ["log_level", "DEBUG, INFO"]),
    ],
)
def test_wrong_settings_stop_with_a_clear_message(tmp_path: Path, text: str, expected: list[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as caught:
        config.load(path)
    message = str(caught.value)
    assert str(path) in message
    for fragment in expected:
        assert fragment in message


def test_cli_exits_2_with_the_message_on_a_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[node]\ndicom_port = 0\n")
    result = run_cli(path, "dicom", check=False, timeout=30)
    assert result.returncode == 2
    assert f"{path}: [node] dicom_port = 0 is not allowed" in result.stderr


def test_cli_missing_file_is_named(tmp_path: Path) -> None:
    result = run_cli(tmp_path / "nowhere.toml", "status", check=False, timeout=30)
    assert result.returncode == 2
    assert "nowhere.toml does not exist" in result.stderr


def test_config_show_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text('[node]\nae_title = "GW2"\nallowed_callers = ["CR01"]\n')
    shown = run_cli(path, "config", "show", timeout=30).stdout
    again = tmp_path / "again.toml"
    again.write_text(shown)
    assert config.load(again).node == config.load(path).node


DESTINATIONS = """
[[destination]]
name = "pacs"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = 4242
accepts = ["uncompressed"]
match = { modality = ["CR", "DX", "CT"] }   # omitted = everything

[[destination]]
name = "osirix"
ae_title = "OSIRIX"
host = "192.0.2.10"
port = 11112
accepts = ["lossless", "1.2.840.10008.1.2.4.50"]
"""


def test_destinations_as_the_issue_writes_them(tmp_path: Path) -> None:
    path = tmp_path / "d.toml"
    path.write_text(DESTINATIONS)
    pacs, osirix = config.load(path).destinations
    assert (pacs.name, pacs.ae_title, pacs.host, pacs.port) == ("pacs", "ORTHANC", "127.0.0.1", 4242)
    assert pacs.accepts == ("uncompressed",) and pacs.match.modality == ("CR", "DX", "CT")
    assert osirix.match.modality == () and osirix.accepts[1] == "1.2.840.10008.1.2.4.50"
    shown = run_cli(path, "config", "show", timeout=30).stdout
    again = tmp_path / "again.toml"
    again.write_text(shown)
    assert config.load(again).destinations == config.load(path).destinations


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[[destination]]\nname = "a"\nae_title = "B"\nhost = "h"\n', "[destination #1] is missing 'port'"),
        ('[destination]\nname = "a"\n', "write [[destination]]"),
        ('[[destination]]\nname = "a"\nae_title = "B"\nhost = "h"\nport = 1\nmatch = { modalty = ["CR"] }\n',
         "[destination #1.match] has unknown key 'modalty'"),
        ('[[destination]]\nname = "a"\nae_title = "B"\nhost = "h"\nport = 1\naccepts = ["zip"]\n',
         "'zip' is neither a class"),
        ('[[destination]]\nname = "a"\nae_title = "B"\nhost = "h"\nport = 1\n'
         '[[destination]]\nname = "a"\nae_title = "C"\nhost = "h"\nport = 2\n', "name 'a' is used twice"),
    ],
)
def test_wrong_destinations_are_named(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as caught:
        config.load(path)
    assert expected in str(caught.value)
