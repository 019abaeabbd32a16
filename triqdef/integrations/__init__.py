"""Integrations with training frameworks; each submodule imports its framework.

``triqdef.integrations.lightning`` needs the ``[lightning]`` extra. Importing this
package imports nothing else: the core never loads a framework.
"""
