"""Runnable examples: ``fastrnn sunspots``, ``fastrnn adding``, ``fastrnn charlm``."""
