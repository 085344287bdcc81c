"""One module per pipeline stage, shared by the DVC stage scripts and the ``tumorseg`` CLI.

Each step takes the validated :class:`~tumorseg.config.Config` plus explicit paths (the paths live
in ``dvc.yaml``), does the work through the library, and returns what it wrote. This file imports
none of them: a stage script imports only its own step, so its ``dvc.yaml`` deps are the code it
runs (``tests/test_dvc_stages.py``).
"""
