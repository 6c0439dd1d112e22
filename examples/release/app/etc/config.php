<?php
return ['modules' => ['Magento_Store' => 1]];
