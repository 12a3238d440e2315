"""latentr3_fast.model"""
