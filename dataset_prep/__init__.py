"""Dataset preparation tools (run as scripts: ``python dataset_prep/<tool>.py --help``)."""
