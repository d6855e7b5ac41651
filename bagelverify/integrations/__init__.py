"""Hooks into training frameworks. Each one is a separate module, imported only on request:
``import bagelverify`` never imports a framework."""
