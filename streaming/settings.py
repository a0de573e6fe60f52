"""One configuration system for every service: pydantic settings from env vars and an optional file.

Precedence (highest first): command-line flags (`ServiceSettings.from_cli`, used by every `python -m <service>`
and console script), constructor arguments, environment variables (`HSNN_<SERVICE>_<FIELD>`, nested with
`__`), the JSON file named by `HSNN_CONFIG_FILE` (its section named after the service), then defaults.
A key in the file's section that names no setting is an error, not a silent no-op. Secrets (`SecretStr`
fields) come from the environment only: a config file or a flag that carries one is refused.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from typing_extensions import Self


class _JsonFileSection(PydanticBaseSettingsSource):
    """Reads the service's section of the JSON file named by HSNN_CONFIG_FILE, if any."""

    def __init__(self, settings_cls: type[BaseSettings], section: str):
        super().__init__(settings_cls)
        self.path = os.environ.get("HSNN_CONFIG_FILE")
        self.section = section
        data = json.loads(Path(self.path).read_text()) if self.path else {}
        if not isinstance(data, dict):
            raise ValueError(f"{self.path}: the config file must hold a JSON object")
        self.values = data.get(section, {})
        if not isinstance(self.values, dict):
            raise ValueError(f"{self.path}: section {section!r} must be a JSON object")

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self.values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        fields = self.settings_cls.model_fields
        unknown = sorted(set(self.values) - set(fields))
        if unknown:
            raise ValueError(
                f"{self.path}: section {self.section!r} has unknown setting(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(fields))}"
            )
        for name in self.values:
            if _is_secret(fields[name]):
                raise ValueError(f"{name} is a secret: set it in the environment, not in the config file")
        return dict(self.values)


def _is_secret(field: FieldInfo) -> bool:
    return "SecretStr" in str(field.annotation)


def _program_name() -> str:
    """`hsnn-trainer` under a console script, `python -m trainer` under -m."""
    script = Path(sys.argv[0])
    return f"python -m {script.parent.name}" if script.name == "__main__.py" else script.name


class ServiceSettings(BaseSettings):
    """Base class: subclasses set `section` and an env prefix like `HSNN_PUBLISHER_`."""

    section: ClassVar[str] = "common"
    model_config = SettingsConfigDict(env_nested_delimiter="__", extra="forbid")

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Logging threshold.")

    @classmethod
    def from_cli(cls, argv: Sequence[str] | None = None, prog: str | None = None) -> Self:
        """Settings with command-line flags on top of env, file and defaults (what every service's main uses).

        Every field is a kebab-case flag (`--store-dir`); `--help` lists each with its default and its
        environment variable, then exits without starting anything. `argv` None reads `sys.argv[1:]`.
        """
        args = list(sys.argv[1:] if argv is None else argv)
        prog = prog or _program_name()
        for name, field in cls.model_fields.items():
            flag = "--" + name.replace("_", "-")
            if _is_secret(field) and any(a == flag or a.startswith(flag + "=") for a in args):
                env = f"{cls.model_config.get('env_prefix', '')}{name}".upper()
                raise SystemExit(f"{prog}: {flag} is a secret: set {env} in the environment (flags show in ps)")
        return cls(
            _cli_parse_args=args,
            _cli_prog_name=prog,
            _cli_kebab_case=True,
            _cli_show_env_vars=True,
            _cli_implicit_flags=False,
        )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _JsonFileSection(settings_cls, cls.section)
