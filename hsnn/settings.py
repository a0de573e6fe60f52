"""One configuration system for every service: pydantic settings from env vars and an optional file.

Precedence (highest first): constructor arguments, environment variables
(`HSNN_<SERVICE>_<FIELD>`, nested with `__`), the JSON file named by `HSNN_CONFIG_FILE`
(its section named after the service), then defaults. Secrets (`SecretStr` fields) come from the
environment only: a config file that carries one is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar

from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


class _JsonFileSection(PydanticBaseSettingsSource):
    """Reads the service's section of the JSON file named by HSNN_CONFIG_FILE, if any."""

    def __init__(self, settings_cls: type[BaseSettings], section: str):
        super().__init__(settings_cls)
        path = os.environ.get("HSNN_CONFIG_FILE")
        data = json.loads(Path(path).read_text()) if path else {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the config file must hold a JSON object")
        self.values = data.get(section, {})

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self.values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        fields = self.settings_cls.model_fields
        for name in self.values:
            if name in fields and "SecretStr" in str(fields[name].annotation):
                raise ValueError(f"{name} is a secret: set it in the environment, not in the config file")
        return {k: v for k, v in self.values.items() if k in fields}


class ServiceSettings(BaseSettings):
    """Base class: subclasses set `section` and an env prefix like `HSNN_PUBLISHER_`."""

    section: ClassVar[str] = "common"
    model_config = SettingsConfigDict(env_nested_delimiter="__", extra="forbid")

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
