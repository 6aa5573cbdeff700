from .checkpoint import (LoadReport, load_checkpoint_file, load_pretrained,
                         select_state_dict)

__all__ = ['LoadReport', 'load_checkpoint_file', 'load_pretrained',
           'select_state_dict']
