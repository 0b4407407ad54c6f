"""The bundled guest images as package data: installed as ``vmm._guest_images`` (setup.py
maps that package onto this directory). Use :mod:`vmm.guests` to find them."""
