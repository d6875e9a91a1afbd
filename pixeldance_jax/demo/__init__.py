"""A web demo of every PixelDance mode over one restored checkpoint:

  python -m pixeldance_jax.demo --workdir=workdirs/tiny [--port=7860]

  app.py      restoring the model and held-out clips, serving until Ctrl-C
  service.py  `Demo`: checks requests, queues them (one at a time), samples and writes them
  server.py   the HTTP server: the page, a JSON API, the generated files
  static/     the page (plain HTML and JavaScript, no build step, nothing from the network)
"""
