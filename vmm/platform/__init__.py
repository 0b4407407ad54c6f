"""What a PC-convention guest finds: the platform's tables and configuration contents.

One file per concern. :mod:`vmm.platform.fw_cfg` builds the fw_cfg items (RAM size, CPU
counts, the file directory) and parses the ``--fw-cfg`` option; the device that serves
them is :class:`vmm.devices.fw_cfg.FwCfg`.
"""

from vmm.platform.fw_cfg import (
    FwCfgFile,
    FwCfgItems,
    FwCfgSource,
    fw_cfg_items,
    load_fw_cfg_files,
    parse_fw_cfg_option,
    parse_fw_cfg_options,
)

__all__ = [
    "FwCfgFile",
    "FwCfgItems",
    "FwCfgSource",
    "fw_cfg_items",
    "load_fw_cfg_files",
    "parse_fw_cfg_option",
    "parse_fw_cfg_options",
]
