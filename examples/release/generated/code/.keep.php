<?php // generated DI code
