"""
Message-level security: what a route does with each whole message, after
the frame-level limits and before the application (see the modules).
"""
