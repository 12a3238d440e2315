"""latentr3_fast.train"""
