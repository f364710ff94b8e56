"""forgetrt.tools"""
