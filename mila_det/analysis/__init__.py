from .complexity import (backbone_macs, count_params, detector_macs,
                         flop_analyzer, selective_scan_macs)

__all__ = ['backbone_macs', 'count_params', 'detector_macs', 'flop_analyzer',
           'selective_scan_macs']
