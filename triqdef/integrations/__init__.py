"""Integrations with training frameworks; each submodule imports its framework.

``triqdef.integrations.lightning`` needs the ``[lightning]`` extra and
``triqdef.integrations.art`` the ``[art]`` extra. Importing this
package imports nothing else: the core never loads a framework.
"""
