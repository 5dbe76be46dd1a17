"""The Kubeflow pipeline of dfdetect: the DAG (`deepfake_pipeline.py`) and how to compile, run and submit it."""
