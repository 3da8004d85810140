"""The web app (Gradio): `ovseg_jax.web.app.build_app` -> a page and the `/segment` API on a `Predictor`.
Started by `python -m ovseg_jax.serve` and by the Hugging Face Space in `space/app.py`."""
