"""Task modules that end-to-end tests serve with real ``tether worker`` subprocesses."""
