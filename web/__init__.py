"""
The map page as a Python package, installed as `livemap_web` (setup.cfg maps
it to this directory): index.html, static/ and the vendored browser
libraries in vendor/ are its package data, so a wheel carries them and the
server finds them beside this file, wherever the package is installed.
"""
