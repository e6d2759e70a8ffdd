"""Hydra glue for saelab's sweep files: a config source that shows a flat directory of
``NAME.yaml`` files as the group ``sweep`` (so ``./sweeps/`` and the shipped
``saelab.sweeps`` need no ``sweep/`` subfolder), and a search-path plugin that adds
one such source per directory of ``saelab.configs.sweep_dirs()``.

Hydra imports every plugin module at each start of any Hydra app, so nothing here
imports saelab: the plugin acts only in processes that have imported
``saelab.configs`` (saelab's CLI does before Hydra starts; so does anything that
asks it for ``conf_dir()``) and only when the primary config is saelab's.
"""

# No `from __future__ import annotations`: Hydra executes plugin modules outside
# sys.modules (see the sweeper plugin).
import sys
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigLoadError, ConfigResult, ConfigSource
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import OmegaConf

GROUP = "sweep"


class SweepFilesSource(ConfigSource):
    """``saelab-sweeps:///abs/dir``: ``dir/NAME.yaml`` is the config ``sweep/NAME``."""

    @staticmethod
    def scheme() -> str:
        return "saelab-sweeps"

    def _file(self, config_path: str) -> Path | None:
        group, _, name = config_path.strip("/").partition("/")
        if group != GROUP or not name or "/" in name:
            return None
        return Path(self.path) / self._normalize_file_name(name)

    def load_config(self, config_path: str) -> ConfigResult:
        file = self._file(config_path)
        if file is None or not file.is_file():
            raise ConfigLoadError(f"Config not found : {self.full_path()}/{config_path}")
        text = file.read_text(encoding="utf-8")
        return ConfigResult(config=OmegaConf.load(file), path=self.full_path(),
                            provider=self.provider, header=self._get_header_dict(text))

    def available(self) -> bool:
        return Path(self.path).is_dir()

    def is_group(self, config_path: str) -> bool:
        return config_path.strip("/") in ("", GROUP)

    def is_config(self, config_path: str) -> bool:
        file = self._file(config_path)
        return file is not None and file.is_file()

    def list(self, config_path: str, results_filter: ObjectType | None) -> list[str]:
        path = config_path.strip("/")
        if path == "" and results_filter in (None, ObjectType.GROUP):
            return [GROUP]
        if path == GROUP and results_filter in (None, ObjectType.CONFIG):
            return sorted(f.stem for f in Path(self.path).glob("*.yaml") if f.is_file())
        return []


class SaelabSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        configs = sys.modules.get("saelab.configs")
        if configs is None or not any(e.provider == "main" and configs.is_primary(e.path)
                                      for e in search_path.get_path()):
            return
        for d in configs.sweep_dirs():
            search_path.append("saelab", f"{SweepFilesSource.scheme()}://{d}")
